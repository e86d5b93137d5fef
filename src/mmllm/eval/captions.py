"""COCO caption metrics through pycocoevalcap (the standard implementation, not a re-implementation).

PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L and CIDEr need Java. SPICE also needs Stanford
CoreNLP models that pycocoevalcap downloads on first use; where it cannot run it is reported as
unavailable, with the reason, and never stops the evaluation.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mmllm.errors import MmllmError

log = logging.getLogger("mmllm")


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float | str]:
    """Corpus-level scores of `predictions` (id -> caption) against `references` (id -> captions)."""
    if shutil.which("java") is None:
        raise MmllmError(
            "caption metrics need Java for pycocoevalcap's tokenizer and METEOR: "
            "apt-get install default-jre-headless (or any JRE 8+ on PATH)"
        )
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise MmllmError(
            "caption metrics need pycocoevalcap: pip install -e '.[eval]' in mmllm's checkout"
        ) from None
    ids = sorted(predictions)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    scores: dict[str, float | str] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    for name, scorer in (("METEOR", Meteor), ("ROUGE-L", Rouge), ("CIDEr", Cider)):
        scores[name] = float(scorer().compute_score(gts, res)[0])
    scores["SPICE"] = _spice(gts, res)
    return scores


def caption_row_metrics(rows: list[dict[str, Any]]) -> dict[str, float | str]:
    """`caption_metrics` of predictions-file rows (each with `prediction` and `references`)."""
    return caption_metrics({r["id"]: r["prediction"] for r in rows}, {r["id"]: r["references"] for r in rows})


def _spice(gts: dict, res: dict) -> float | str:
    try:
        from pycocoevalcap.spice import get_stanford_models as corenlp
        from pycocoevalcap.spice.spice import Spice

        jar = Path(corenlp.SPICEDIR) / corenlp.SPICELIB / f"{corenlp.JAR}.jar"
        if not jar.is_file() and os.environ.get("HF_HUB_OFFLINE") == "1":
            # Offline, its first use would only fail at DNS after trying to download CoreNLP.
            log.info("SPICE skipped: offline (HF_HUB_OFFLINE=1) and Stanford CoreNLP is not installed")
            return "unavailable (offline: needs Stanford CoreNLP models from the internet)"

        return float(Spice().compute_score(gts, res)[0])
    except Exception as err:  # its CoreNLP models come from a download that may be impossible here
        log.info("SPICE unavailable: %s", err)
        return f"unavailable ({type(err).__name__}: needs Stanford CoreNLP models from the internet)"

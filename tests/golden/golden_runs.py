"""Golden outputs: what the toolkit computes on fixed tiny inputs, reduced to comparable fingerprints.

Used by tests/golden/test_golden.py (recompute and compare) and scripts/record_goldens.py (record).
Each entry maps a name to a fingerprint: for tensors the sha256 of their bytes (bit identity) plus
float64 sum and L2 norm (a tolerance check on machines whose CPU kernels differ from the recording one);
for numbers and JSON the values themselves.

What is covered (issue 12): the first 5 losses and the final weights of every family x LoRA/full, a
prepared cache's tensors, a sampled image and an evaluate results.json.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

WORDS = ["a", "small", "large", "red", "green", "blue", "circle", "square", "photo", "of", "cat", "dog"]
FAMILIES = {"sd": ("sd", "epsilon"), "sd_v": ("sd", "v_prediction"), "sdxl": ("sdxl", "epsilon"),
            "lcm": ("lcm", "epsilon")}
JUDGE = '''
import numpy as np

def brightness(images, prompts):
    return [float(np.asarray(im, dtype=np.float32).mean()) for im in images]
'''


def fingerprint(t: torch.Tensor) -> dict:
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    d = t.double()
    return {"sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(), "shape": list(t.shape), "dtype": str(t.dtype),
            "sum": float(d.sum()), "norm": float(d.norm())}


def _tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def _cache_tensors(folder: Path) -> dict:
    """A cache as its reader returns it: the empty prompt, and each shard's tensors per pair (cache.store.read_shard:
    each pair's text conditioning in its place, whether stored with the pair or in the prompt table), so the
    golden holds what training reads, whatever the file layout. Keys are file names, not the folder's (a key
    hashed from paths that differ per run)."""
    from safetensors.torch import load_file

    from diffusion_dpo.cache.store import EMPTY_PROMPT, read_manifest, read_shard

    tensors = {f"{EMPTY_PROMPT}:{k}": v for k, v in load_file(str(folder / EMPTY_PROMPT)).items()}
    for k, entry in enumerate(read_manifest(folder)["shards"]):
        tensors.update({f"{entry['file']}:{name}": t for name, t in read_shard(folder, k).items()})
    return {k: fingerprint(v) for k, v in sorted(tensors.items())}


def pipelines(root: Path) -> dict[str, Path]:
    from diffusion_dpo.models.build import save_tiny_pipeline

    out = {}
    for name, (family, pred) in FAMILIES.items():
        out[name] = save_tiny_pipeline(root / f"tiny_{name}", family=family, prediction_type=pred, resolution=32,
                                       words=WORDS)
    return out


def _train(model: Path, source: Path, out: Path, finetune: str) -> None:
    from diffusion_dpo.cli import main

    code = main(["train", f"model.pretrained={model}", f"data.source={source}", "data.resolution=32",
                 "data.random_flip=true", "data.crop=random", "data.caption_dropout=0.25", "train.max_steps=5",
                 "train.batch_size=2", "train.learning_rate=1e-3", "train.checkpoint_every=0",
                 f"train.finetune={finetune}", "lora.rank=4", "output.report_to=none", f"output.dir={out}"])
    assert code == 0, f"training {out.name} failed"


def compute(root: Path) -> dict:
    """Every golden output, computed from scratch under `root` (a temporary folder)."""
    from diffusion_dpo.cli import main
    from diffusion_dpo.data.synthetic import write_pickapic_parquet

    root = Path(root)
    models = pipelines(root)
    # non-square images (40x48) so sizes, crops and SDXL time ids matter
    source = write_pickapic_parquet(root / "pairs.parquet", n=8, size=(40, 48))
    goldens: dict = {}
    for name, model in models.items():
        for finetune in ("lora", "full"):
            out = root / f"run_{name}_{finetune}"
            _train(model, source, out, finetune)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            key = f"train/{name}/{finetune}"
            goldens[f"{key}/losses"] = [r["loss"] for r in rows[:5]]
            weights = (out / "unet") if finetune == "full" else out
            tensors = {k: v for k, v in _tensors_of(weights).items() if not k.startswith("checkpoints")}
            goldens[f"{key}/weights"] = {k: fingerprint(v) for k, v in sorted(tensors.items())}
    # a prepared cache (SDXL: latents, both text encoders, sizes and crops)
    cache = root / "cache"
    assert main(["prepare", f"model.pretrained={models['sdxl']}", f"data.source={source}", "data.resolution=32",
                 "data.random_flip=true", f"data.cache_dir={cache}", "--no-progress"]) == 0
    goldens["cache/sdxl"] = _cache_tensors(next(cache.iterdir()))
    # a sample image and an evaluate results.json
    prompts = root / "prompts.csv"
    prompts.write_text("prompt,category\na red cat,animals\na blue square,colors\n")
    samples = root / "samples"
    for name, model in (("base", models["sd"]), ("v", models["sd_v"])):
        assert main(["sample", "--base", str(model), "--name", name, "--out", str(samples), "--prompts", str(prompts),
                     "--steps", "2", "--resolution", "32", "--images-per-prompt", "2", "--quiet"]) == 0
    png = sorted((samples / "base").glob("*.png"))[0]
    from PIL import Image

    pixels = Image.open(png)
    goldens["sample/base/first_image"] = {"sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                                          "mean": float(torch.tensor(list(pixels.getdata()), dtype=torch.float64).mean())}
    judge_dir = root / "judge"
    judge_dir.mkdir()
    (judge_dir / "golden_judge.py").write_text(JUDGE)
    import sys

    sys.path.insert(0, str(judge_dir))
    try:
        assert main(["evaluate", "--samples", str(samples), "--out", str(root / "report"), "--baseline", "base",
                     "--metrics", "golden_judge:brightness", "--bootstrap", "200", "--quiet"]) == 0
    finally:
        sys.path.remove(str(judge_dir))
        sys.modules.pop("golden_judge", None)
    results = json.loads((root / "report" / "results.json").read_text())
    goldens["evaluate/results"] = _stable(results, str(root))
    return goldens


_VOLATILE = {"created", "timestamp", "seconds", "elapsed", "time", "date", "version", "versions"}


def _stable(obj, root: str):
    """results.json without wall-clock fields, with the temporary root replaced by <root>."""
    if isinstance(obj, dict):
        return {k: _stable(v, root) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_stable(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    return obj


def machine() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def dumps(goldens: dict) -> str:
    buf = io.StringIO()
    json.dump({"machine": machine(), "goldens": goldens}, buf, indent=1, sort_keys=True)
    return buf.getvalue() + "\n"

"""The installed wheel, used as a user uses it (``make test-wheel``).

``make test-wheel`` builds the wheel (``pip wheel --no-deps .``), installs it, not editable, with
the extras a Lightning user picks (``[lightning,megatron,hf]``) into a clean ``.venv-wheel``,
copies this file into an empty temporary directory and runs pytest on it there, so nothing of
the source tree can be imported.  Not collected by ``make test`` (the name is not ``test_*``).

What a user does, in that order: import the package; write a Hydra recipe of their own that
takes the ``hf_export`` group from the package; train a tiny Megatron-Core model with it on CPU
(the callback exports beside every checkpoint); check the export with ``nemo-export-hooks
verify`` and load it in transformers; and, for what is not installed there, read which extra
to install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

RECIPE = """\
# a user's own recipe: the hf_export group comes from the installed package
hydra:
  searchpath:
    - pkg://nemo_export_hooks.conf
  run:
    dir: ${out}/hydra
defaults:
  - hf_export: default
  - _self_

out: ???
steps: 4
checkpoint_every: 2
hf_export:
  arch: qwen3_moe
  dtype: float32
  on_busy: wait
"""

TRAIN = """\
import json, sys
import hydra

@hydra.main(config_path="conf", config_name="my_recipe", version_base=None)
def main(cfg):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nemo_export_hooks import callbacks_from_cfg
    from nemo_export_hooks.demo import max_logit_diff
    from nemo_export_hooks.testing.cpu import TinySpec, init_single_process
    from nemo_export_hooks.testing.lightning import TinyMegatronLM

    init_single_process()
    spec = TinySpec()
    model = TinyMegatronLM(spec, seq_len=32, batch_size=4)
    exporters = callbacks_from_cfg(cfg)
    ckpt = ModelCheckpoint(dirpath=f"{cfg.out}/checkpoints", every_n_train_steps=cfg.checkpoint_every, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=cfg.steps, callbacks=[ckpt, *exporters], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model)
    exports = [e["path"] for cb in exporters for e in cb.exports]
    diff = max_logit_diff(exports[-1], model.module, spec.vocab_size)[0] if exports else None
    print("RESULT " + json.dumps({"exports": exports, "logit_diff": diff}))

main()
"""


def run(args, cwd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_imported_from_the_installed_wheel():
    import nemo_export_hooks
    from nemo_export_hooks.conf import group_file

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    pkg = Path(nemo_export_hooks.__file__).resolve().parent
    assert pkg.parent == site, f"nemo_export_hooks imported from {pkg}, not the venv's {site}"
    assert nemo_export_hooks.__version__ != "0+unknown"
    assert not list(site.glob("__editable__*nemo_export_hooks*")), "an editable install, not the wheel"
    assert Path(str(group_file("default"))).is_file() and Path(str(group_file("qat"))).is_file()
    with pytest.raises(ImportError):
        import recipes  # noqa: F401  (the repository's; it must not be reachable from here)


def test_users_recipe_trains_exports_and_verifies(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "my_recipe.yaml").write_text(RECIPE)
    (tmp_path / "train.py").write_text(TRAIN)
    out = tmp_path / "run"
    p = run([sys.executable, "train.py", f"out={out}", "hf_export.enabled=true"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    names = sorted(Path(e).name for e in result["exports"])
    assert names == ["epoch=0-step=2-hf", "epoch=0-step=4-hf"], result
    assert result["logit_diff"] < 1e-4, result  # transformers' logits from the export vs Megatron's, float32
    v = run([str(BIN / "nemo-export-hooks"), "verify", str(out / "checkpoints" / "latest")], cwd=tmp_path)
    assert v.returncode == 0 and v.stdout.startswith("OK:") and "config loads in transformers" in v.stdout, v.stdout + v.stderr


MISSING = {  # extra -> (what the user runs, packages made absent; none: really absent here)
    "lightning": ("from nemo_export_hooks import HFExportCallback", ["lightning", "pytorch_lightning"]),
    "megatron": ("from nemo_export_hooks.testing.cpu import build_gpt", ["megatron"]),
    "quant": ("from nemo_export_hooks.extras import require; require('quant', 'modelopt.torch.quantization', 'QAT')", []),
    "bridge": ("from nemo_export_hooks.extras import require; require('bridge', 'megatron.bridge', 'Bridge training')", []),
}


@pytest.mark.parametrize("extra", sorted(MISSING))
def test_missing_extra_is_named(extra, tmp_path):
    code, blocked = MISSING[extra]
    if not blocked:  # not in [lightning,megatron,hf]: truly not installed in this venv
        top = {"quant": "modelopt", "bridge": "megatron.bridge"}[extra]
        assert run([sys.executable, "-c", f"import {top}"], cwd=tmp_path).returncode != 0, f"{top} is installed here"
    pre = f"from nemo_export_hooks.testing.absent import block; block(*{blocked!r})\n" if blocked else ""
    p = run([sys.executable, "-c", pre + code], cwd=tmp_path)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode != 0 and last.startswith("nemo_export_hooks.extras.MissingExtraError: "), p.stderr[-2000:]
    assert last.endswith(f'pip install "nemo-export-hooks[{extra}]"'), last

"""ExportConfig: a dataclass that is also an OmegaConf structured config; static validation;
filename templates."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from nemo_export_hooks.config import ExportConfig, check_filename_template, render_filename


def test_defaults_are_on_and_safe():
    c = ExportConfig(arch="qwen3_moe").validate()
    assert c.enabled and c.on_checkpoint_save and c.async_write and not c.fail_on_error
    assert c.on_busy == "skip" and c.placement == "auto" and c.every_n_train_steps is None and not c.at_train_end
    assert c.has_trigger
    assert not ExportConfig(arch="qwen3_moe", on_checkpoint_save=False).has_trigger


def test_structured_config_round_trip():
    schema = OmegaConf.structured(ExportConfig)
    assert OmegaConf.is_missing(schema, "arch") is False and schema.arch is None
    merged = OmegaConf.merge(schema, OmegaConf.create({"arch": "qwen3", "keep_last_k": 3, "hf_config_overrides": {"a": 1}}))
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, ExportConfig) and obj.keep_last_k == 3 and obj.hf_config_overrides == {"a": 1}
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"keep_last_k": "three"})
    # override through a dotlist, as on a Hydra command line
    c = ExportConfig.from_any(OmegaConf.merge(schema, OmegaConf.from_dotlist(["arch=llama", "every_n_train_steps=100", "async_write=false"])))
    assert (c.arch, c.every_n_train_steps, c.async_write) == ("llama", 100, False)


def test_from_any_sources_and_overrides():
    base = ExportConfig(arch="qwen3_moe", keep_last_k=2)
    c = ExportConfig.from_any(base, dtype="float32")
    assert c.dtype == "float32" and c.keep_last_k == 2 and base.dtype == "bfloat16"  # input untouched
    assert ExportConfig.from_any({"arch": "mixtral"}).arch == "mixtral"
    assert ExportConfig.from_any(None, arch="llama").arch == "llama"
    assert ExportConfig.from_any(OmegaConf.create({"arch": "???", "enabled": False})).arch is None
    with pytest.raises(ValueError, match="unknown hf_export option"):
        ExportConfig.from_any({"arch": "qwen3_moe", "every_n_steps": 5})
    with pytest.raises(ValidationError):
        ExportConfig.from_any({"arch": "qwen3_moe", "every_n_train_steps": "often"})


def test_interpolations_are_resolved():
    cfg = OmegaConf.create({"algo": "fp8", "hf_export": {"arch": "qwen3_moe", "expect_quant": "${algo}"}})
    c = ExportConfig.from_any(cfg.hf_export).validate()
    assert c.expect_quant == "fp8"


def test_disabled_config_is_not_validated():
    assert ExportConfig(enabled=False, arch="nonsense", dtype="int3").problems() == []


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as ei:
        ExportConfig(arch="nope", dtype="int8", on_busy="later", keep_last_k=-2).validate()
    msg = str(ei.value)
    for part in ("unknown arch", "dtype", "on_busy", "keep_last_k"):
        assert part in msg


def test_tokenizer_options(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    assert ExportConfig(arch="qwen3", tokenizer=str(tmp_path)).problems() == []
    assert ExportConfig(arch="qwen3", tokenizer="auto").problems() == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has none of" in " ".join(ExportConfig(arch="qwen3", tokenizer=str(empty)).problems())

    class WithSave:
        def save_pretrained(self, d):
            pass

    class Wrapper:  # NeMo's AutoTokenizer keeps the HF tokenizer as .tokenizer
        tokenizer = WithSave()

    assert ExportConfig(arch="qwen3", tokenizer=WithSave()).problems() == []
    assert ExportConfig(arch="qwen3", tokenizer=Wrapper()).problems() == []
    assert "save_pretrained" in " ".join(ExportConfig(arch="qwen3", tokenizer=object()).problems())
    # an object tokenizer cannot live in OmegaConf, but from_any still takes it
    c = ExportConfig.from_any({"arch": "qwen3"}, tokenizer=WithSave())
    assert isinstance(c.tokenizer, WithSave)
    m = c.to_manifest()
    assert m["tokenizer"] == "WithSave" and json.dumps(m)


def test_to_manifest_has_every_field():
    m = ExportConfig(arch="qwen3_moe", hf_config_overrides={"x": [1, 2]}).to_manifest()
    assert set(m) == {f.name for f in dataclasses.fields(ExportConfig)}
    assert json.loads(json.dumps(m)) == m


@pytest.mark.parametrize(
    "template,ok",
    [
        ("{checkpoint}-hf", True),
        ("hf-{step:07d}", True),
        ("e{epoch}-s{step}", True),
        ("fixed-name", True),
        ("../{step}", False),
        ("..", False),
        ("/tmp/{step}", False),
        ("a/{step}", False),
        ("a\\{step}", False),
        (".{step}", False),
        ("latest", False),
        ("latest.txt", False),
        ("{step}{unknown}", False),
        ("{0}", False),
        ("{step", False),
        ("", False),
        ("{step.real}", False),
        # issue 15, item 4: names that can never be created
        ("{step:0>300}", False),
        ("hf\x00{step}", False),
        ("hf\n{step}", False),
        ("hf\t{step}", False),
        ("hf\x7f{step}", False),
        (" hf-{step}", False),
        ("hf-{step} ", False),
        ("{step:0>200}", True),
        ("x" * 237, True),
        ("x" * 238, False),
    ],
)
def test_filename_templates(template, ok):
    if ok:
        check_filename_template(template)
    else:
        with pytest.raises(ValueError):
            check_filename_template(template)


def test_render_filename():
    assert render_filename("{checkpoint}-hf", "epoch=0-step=10", 10, 0) == "epoch=0-step=10-hf"
    assert render_filename("hf-{step:06d}-e{epoch}", "x", 42, 3) == "hf-000042-e3"
    with pytest.raises(ValueError):
        render_filename("{checkpoint}", "..", 1, 0)  # a rendered name is re-checked


def test_filename_messages_and_file_system_limit(tmp_path):
    with pytest.raises(ValueError, match=r"'hf\\x00\{step\}' is rejected: it contains control character\(s\) '\\x00'"):
        check_filename_template("hf\x00{step}")
    with pytest.raises(ValueError, match="starts or ends with whitespace"):
        check_filename_template("hf-{step} ")
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(ValueError, match=rf"a name of 300 bytes .*limit of {limit} bytes per name \(at most {limit - 18}\)"):
        check_filename_template("{step:0>300}", tmp_path / "not-yet" / "created")
    # a step that grows the name past the limit is caught when rendered
    check_filename_template("{step:0>230}", tmp_path)
    with pytest.raises(ValueError, match="a name of 240 bytes"):
        render_filename("{step}", "x", int("9" * 240), 0, directory=tmp_path)
    # setup (validate) refuses it, listing it with the other problems
    with pytest.raises(ValueError, match=r"invalid hf_export config:\n  - filename '\{step:0>300\}' is rejected"):
        ExportConfig(arch="qwen3_moe", dirpath=str(tmp_path), filename="{step:0>300}").validate()


def test_symlinked_dirpath_is_followed_and_logged_once(tmp_path, caplog):
    """Issue 15, item 6: a dirpath reached through a symlink is followed, and said so once."""
    import logging

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    d = tmp_path / "link" / "exports"
    with caplog.at_level(logging.INFO, logger="nemo_export_hooks"):
        cfg = ExportConfig(arch="qwen3_moe", dirpath=str(d))  # validate() at construction
        cfg.validate()  # and again at setup
        ExportConfig(arch="qwen3_moe", dirpath=str(real)).validate()  # no symlink: nothing said
    notes = [r.getMessage() for r in caplog.records if "symlink" in r.getMessage()]
    assert notes == [f"hf_export: dirpath {d} goes through the symlink {tmp_path / 'link'} -> {real}; exports are written in {real / 'exports'}"]


class _Tok:
    def save_pretrained(self, d):
        pass


@pytest.mark.parametrize("key,word,want", [("enabled", "false", False), ("fail_on_error", "false", False), ("update_latest", "no", False), ("async_write", "On", True)])
def test_string_booleans_are_parsed_on_every_path(key, word, want):
    """A tokenizer object keeps the config out of OmegaConf; its booleans are still parsed
    (issue 24, item 6): "false" is False, never a truthy string."""
    c = ExportConfig.from_any(arch="qwen3_moe", tokenizer=_Tok(), **{key: word})
    assert getattr(c, key) is want
    from nemo_export_hooks.integrations.lightning import HFExportCallback
    from nemo_export_hooks.integrations.megatron_bridge import HFExportBridgeCallback

    for cls in (HFExportCallback, HFExportBridgeCallback):
        assert getattr(cls(arch="qwen3_moe", tokenizer=_Tok(), **{key: word}).config, key) is want


@pytest.mark.parametrize("key", ["enabled", "fail_on_error", "update_latest"])
def test_non_boolean_values_are_refused_naming_the_key(key):
    with pytest.raises(ValueError, match=f"{key} must be true or false, got 'false'"):
        ExportConfig(arch="qwen3_moe", **{key: "false"}).validate()
    with pytest.raises(ValueError, match=f"hf_export.{key} must be true or false, got 'maybe'"):
        ExportConfig.from_any(arch="qwen3_moe", tokenizer=_Tok(), **{key: "maybe"})

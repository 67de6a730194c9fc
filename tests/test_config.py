"""Config parsing: YAML presets, key=value overrides, typos, types, resume compatibility."""

from dataclasses import dataclass, field

import pytest

from rlswift import config as cfglib


@dataclass
class Inner:
    rank: int = 0
    """LoRA rank."""
    alpha: float = 16.0
    """Scale."""


@dataclass
class Cfg:
    lr: float = 1e-5
    """Learning rate."""
    steps: int = 10
    """Steps."""
    name: str | None = None
    """A name."""
    funcs: list[str] = field(default_factory=lambda: ["a"])
    """Functions."""
    flag: bool = False
    """A flag."""
    inner: Inner = field(default_factory=Inner)
    """Nested."""


def test_overrides_types_and_nesting(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 3.0e-4\nsteps: 5\ninner:\n  rank: 4\n")
    cfg = cfglib.load(Cfg, preset, ["steps=7", "inner.alpha=8", "funcs=[x, y]", "flag=true", "name=run1", "lr=1e-3"])
    assert cfg.steps == 7 and cfg.inner.rank == 4 and cfg.inner.alpha == 8.0
    assert cfg.funcs == ["x", "y"] and cfg.flag is True and cfg.name == "run1"
    # YAML 1.1 reads "1e-3" as a string; the field type makes it a float.
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)
    assert cfglib.load(Cfg, None, ["funcs=a,b"]).funcs == ["a", "b"]
    assert cfglib.load(Cfg, None, ["name=null"]).name is None


def test_typo_suggests_the_closest_key():
    with pytest.raises(cfglib.ConfigError, match="unknown config key 'setps'.*Did you mean 'steps'"):
        cfglib.load(Cfg, None, ["setps=3"])
    with pytest.raises(cfglib.ConfigError, match="inner.rnak.*Did you mean 'rank'"):
        cfglib.load(Cfg, None, ["inner.rnak=3"])


def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(cfglib.ConfigError, match="steps='many' is not an integer"):
        cfglib.load(Cfg, None, ["steps=many"])
    with pytest.raises(cfglib.ConfigError, match="steps=2.5 is not an integer"):
        cfglib.load(Cfg, None, ["steps=2.5"])
    with pytest.raises(cfglib.ConfigError, match="not key=value"):
        cfglib.load(Cfg, None, ["steps"])
    with pytest.raises(cfglib.ConfigError, match="does not exist"):
        cfglib.load(Cfg, tmp_path / "missing.yaml", [])


def test_help_lists_fields_with_docstrings(capsys):
    with pytest.raises(SystemExit):
        cfglib.parse_cli(Cfg, ["--help"], prog="x")
    out = capsys.readouterr().out
    assert "inner.rank = 0" in out and "LoRA rank." in out and "Learning rate." in out


def test_changed_keys_allows_run_length_keys():
    a = cfglib.to_dict(Cfg())
    b = cfglib.to_dict(cfglib.load(Cfg, None, ["steps=99", "inner.rank=2"]))
    assert cfglib.changed_keys(a, b, {"steps"}) == ["inner.rank: 0 -> 2"]
    assert cfglib.changed_keys(a, b, {"steps", "inner.rank"}) == []


def test_recipe_configs_have_a_docstring_per_field():
    import dataclasses

    from rlswift.recipes.dpo import DPOConfig
    from rlswift.recipes._common import LoraConfig
    from rlswift.recipes.grpo import GRPOConfig  # noqa: F401

    for cls in (GRPOConfig, DPOConfig, LoraConfig):
        docs = cfglib.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_section_shorthand_sets_its_name_field():
    from dataclasses import dataclass, field

    @dataclass
    class Opt:
        name: str = "adamw"
        rank: int = 128

    @dataclass
    class Cfg:
        optimizer: Opt = field(default_factory=Opt)

    assert cfglib.load(Cfg, None, ["optimizer=galore_adamw"]).optimizer == Opt("galore_adamw", 128)
    assert cfglib.load(Cfg, None, ["optimizer=galore_adamw", "optimizer.rank=8"]).optimizer == Opt("galore_adamw", 8)


def test_grpo_computing_keys_added_later_keep_old_runs_numerics():
    # A run saved before shared_prompt / pack_completions existed computed without them: the migration says so, so
    # a resume under today's defaults is refused, naming the keys, and one with the old values passes.
    from rlswift.recipes.grpo import RESUMABLE_KEYS, GRPOConfig, migrate_config

    today = cfglib.to_dict(GRPOConfig(shared_prompt=True))  # today's defaults as main resolves them on the CPU
    old = {k: v for k, v in today.items() if k not in ("shared_prompt", "pack_completions")}
    saved = migrate_config(dict(old))
    assert saved["shared_prompt"] is False and saved["pack_completions"] is False
    assert cfglib.changed_keys(saved, today, RESUMABLE_KEYS, defaults=today) == [
        "pack_completions: False -> True", "shared_prompt: False -> True"]
    same = cfglib.to_dict(cfglib.load(GRPOConfig, None, ["shared_prompt=false", "pack_completions=false"]))
    assert cfglib.changed_keys(saved, same, RESUMABLE_KEYS, defaults=today) == []
    # A run saved with packing keeps it; turning it off on resume is refused like any computing key.
    off = cfglib.to_dict(cfglib.load(GRPOConfig, None, ["shared_prompt=true", "pack_completions=false"]))
    assert cfglib.changed_keys(migrate_config(dict(today)), off, RESUMABLE_KEYS, defaults=today) == [
        "pack_completions: True -> False"]

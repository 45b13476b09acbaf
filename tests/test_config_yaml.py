"""Issue 21, group A: a config file an attacker wrote: alias bombs, duplicate keys, huge values."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner.cli.main import main
from captioner.config import ConfigError, apply_overrides, load_config
from captioner.training.config import TrainConfig

MEMORY_CAP = 3 << 30  # a run that misbehaves stops at 3 GB of address space, not at the machine's memory


def run_capped(*args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True, timeout=timeout,
                       preexec_fn=cap)
    return r, time.perf_counter() - t0


def bomb(levels: int, width: int, key: str = "model") -> str:
    """The "billion laughs" of YAML: each level a list of ``width`` aliases of the level below."""
    lines = ["x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return f"{key}:\n" + "\n".join("  " + line for line in lines) + "\n"


def test_21_1_an_alias_bomb_under_a_known_key_exits_2_at_once_with_bounded_memory(tmp_path):
    """9 levels of 9 aliases: 387 million values once expanded. It hung and grew past 2 GB."""
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb(9, 9))
    r, seconds = run_capped("train", "--config", str(cfg))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {cfg}: ") and "alias" in r.stderr and "Traceback" not in r.stderr
    assert seconds < 30


def test_21_1_an_alias_bomb_is_refused_in_a_file_and_in_an_override(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb(6, 10))  # a million values: loaded (slowly) before
    with pytest.raises(ConfigError, match=r"expands to more than .* values.*alias"):
        load_config(TrainConfig, cfg)
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    flow = "{" + ", ".join(levels) + "}"
    with pytest.raises(ConfigError, match=r"override 'model=.*expands to more than"):
        apply_overrides(TrainConfig(), [f"model={flow}"])


def test_aliases_of_reasonable_size_still_work(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("optim: &o\n  lr: 0.001\n  epochs: 3\n"
                   "then:\n  - name: more\n    optim: *o\n  - name: again\n    optim:\n      <<: *o\n      epochs: 5\n")
    loaded = load_config(TrainConfig, cfg)
    assert loaded.optim.lr == 0.001 and loaded.then[0]["optim"] == {"lr": 0.001, "epochs": 3}
    assert loaded.then[1]["optim"] == {"lr": 0.001, "epochs": 5}  # a merge key's explicit value is no duplicate


def test_21_duplicate_yaml_keys_are_refused_naming_the_key_and_line(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("arch: sat\noptim:\n  lr: 0.001\n  epochs: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, cfg)
    assert str(e.value).startswith(f"{cfg}:5: ") and "'lr'" in str(e.value) and "line 3" in str(e.value)
    cfg.write_text("out_dir: a\nseed: 1\nout_dir: b\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: duplicate key 'out_dir'"):
        load_config(TrainConfig, cfg)
    with pytest.raises(ConfigError, match="duplicate key 'dropout'"):
        apply_overrides(TrainConfig(), ["model={dropout: 0.1, dropout: 0.5}"])


@pytest.mark.parametrize("where", ["file", "override"])
def test_21_a_huge_value_is_never_echoed_whole(tmp_path, capsys, where):
    """A 300 KB value (a 50 MB one was printed whole on stderr): the message quotes at most a few hundred
    characters of it and names the setting."""
    huge = "x" * 300_000
    if where == "file":
        cfg = tmp_path / "huge.yaml"
        cfg.write_text(f"data: {{corpus: c.json, features: f}}\noptim:\n  schedule: {huge}\n")
        status = main(["train", "--config", str(cfg)])
    else:
        status = main(["train", "data.corpus=c.json", "data.features=f", f"optim.schedule={huge[:100_000]}"])
    err = capsys.readouterr().err
    assert status == 2 and "optim.schedule" in err and len(err) < 1500, err[:3000]


@pytest.mark.parametrize("value", ["[" + "1, " * 100_000 + "1]",
                                   "{" + ", ".join(f"k{i}: 1" for i in range(50_000)) + "}"])
def test_21_type_errors_quote_a_shortened_value(value):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), [f"seed={value}"])
    assert "seed" in str(e.value) and len(str(e.value)) < 1000


def test_21_a_50_mb_config_file_is_refused_before_it_is_read(tmp_path, capsys):
    cfg = tmp_path / "big.yaml"
    with cfg.open("w") as f:
        f.write("optim:\n  schedule: ")
        f.write("y" * (50 << 20))
        f.write("\n")
    status = main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert status == 2 and str(cfg) in err and "MiB" in err and len(err) < 500, err[:2000]

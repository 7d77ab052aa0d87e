"""The config layer and the command line: flags generated from CompressConfig/ZeroQConfig round
trip through the rebuilt command, every flag has help, registries feed every choice list and
error, user models and data load from the current folder, errors stay one line."""

from __future__ import annotations

import shlex
import subprocess
import sys
import textwrap
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import hawq
from hawq.ui.cli import build_parser, main
from hawq.post.config import (METHODS, CompressConfig, ZeroQConfig, config_from_args, config_from_dict,
                         config_to_argv)
from hawq.base.errors import ConfigError, HawqError
from hawq.ui.report import reconstructed_command

# ----------------------------------------------------------------------------- round trip

#: A value different from the default for every CompressConfig field (budget fields that exclude
#: each other are varied in _BUDGETS).
_COMPRESS = dict(model="resnet32", data_dir="/data dir/x", sensitivity="fisher",
                 allocator="frontier", bits=(2, 3, 4, 8), a_bits=6, pin_first_last=4,
                 hessian_samples=100, max_probes=7, tol=0.05, probe_mode="layer",
                 calib_samples=200, test_samples=300, w_clip="mse", bias_correct=True,
                 refine=True, refine_samples=64, refine_candidates=3, seed=5, episodes=7,
                 reward_samples=50, channel_groups=2, compare_uniform=False, task="causal-lm",
                 data="mydata:make")
_BUDGETS = [dict(target_compression=6.0), dict(target_avg_bits=3.5),
            dict(target_bytes=1234.0, bops_limit=1.5),
            dict(target_fraction=0.25, latency_table="lat.json", latency_limit=2.5)]

_ZEROQ = dict(model="resnet56", data_dir="/z", bits=(3, 4, 8), a_bits=6, pin_first_last=4,
              sensitivity="hessian", allocator="ilp", data_source="real", distill_batch=8,
              distill_iters=9, distill_lr=0.1, distill_init="gaussian", distill_label_weight=0.0,
              input_shape=(3, 16, 16), calib_samples=64, hessian_max_probes=9, hessian_tol=0.03,
              w_clip="mse", a_calibration="percentile", evaluate=False, test_samples=10,
              compare_uniform=False, seed=3, task="embedding", data="d.mod:f")
_ZEROQ_BUDGETS = [dict(w_bits=4), dict(target_compression=6.0, bops_limit=2.0),
                  dict(target_avg_bits=5.0, latency_table="l.json", latency_limit=1.0),
                  dict(target_bytes=99.0), dict(target_fraction=0.5)]


def _parse_back(command: str):
    argv = shlex.split(command)
    assert argv[0] == "hawq"
    return build_parser().parse_args(argv[1:])


def _non_default(cfg) -> set[str]:
    """Fields of ``cfg`` away from their defaults (and not derived by the config itself)."""
    return {f.name for f in fields(cfg)
            if getattr(cfg, f.name) != f.default and f.name not in cfg.derived_fields()}


@pytest.mark.parametrize("method", [None, *METHODS])
def test_every_compress_field_round_trips_through_the_rebuilt_command(method):
    covered: set[str] = set()
    for budget in _BUDGETS:
        values = {**_COMPRESS, **budget, "method": method}
        if method is not None and METHODS[method][1] not in ("frontier", "ilp"):
            values["refine"] = False  # refine=True needs a plan chosen from Omega
        if method is None and "bops_limit" in budget:
            values["allocator"] = "ilp"
        cfg = CompressConfig(**values)
        cmd = reconstructed_command(asdict(cfg))
        back = config_from_args(CompressConfig, _parse_back(cmd))
        assert back == cfg, cmd
        assert config_from_dict(CompressConfig, asdict(cfg)) == cfg
        covered |= _non_default(cfg)
        if method == "cw-hawq":
            assert "--episodes 7" in cmd
        if method is not None:  # the preset's choices are implied, not repeated
            assert "--allocator" not in cmd
    all_fields = {f.name for f in fields(CompressConfig)}
    expected = all_fields - ({"method"} if method is None else {"sensitivity", "allocator"})
    assert expected <= covered, expected - covered


def test_every_zeroq_field_round_trips_through_the_rebuilt_command():
    covered: set[str] = set()
    for budget in _ZEROQ_BUDGETS:
        cfg = ZeroQConfig(**{**_ZEROQ, **budget})
        argv = config_to_argv(cfg)
        cmd = reconstructed_command(asdict(cfg))
        assert shlex.split(cmd)[:2] == ["hawq", "zeroq"]
        back = config_from_args(ZeroQConfig, build_parser().parse_args(["zeroq", *argv]))
        assert back == cfg, argv
        assert config_from_args(ZeroQConfig, _parse_back(cmd)) == cfg
        covered |= _non_default(cfg)
    assert covered == {f.name for f in fields(ZeroQConfig)}


def test_defaults_rebuild_to_the_bare_command():
    assert reconstructed_command(asdict(CompressConfig())) == "hawq compress"
    assert config_to_argv(ZeroQConfig()) == []
    # the default compression 8 is derived, an explicit other target is not
    assert config_to_argv(CompressConfig(target_compression=8)) == []
    assert config_to_argv(CompressConfig(target_avg_bits=4)) == ["--target-avg-bits", "4"]
    assert config_to_argv(CompressConfig(refine=False)) == ["--no-refine"]


def test_parser_defaults_equal_the_config_defaults():
    for command, cls in (("compress", CompressConfig), ("zeroq", ZeroQConfig)):
        assert config_from_args(cls, build_parser().parse_args([command])) == cls()


# ----------------------------------------------------------------------------- flag names

def test_one_flag_name_per_meaning_and_old_spellings_still_parse():
    p = build_parser()
    a = p.parse_args(["compress", "--hessian-samples", "10", "--test-samples", "20",
                      "--calib-samples", "30"])
    assert (a.hessian_samples, a.test_samples, a.calib_samples) == (10, 20, 30)
    assert p.parse_args(["compress", "--samples", "11"]).hessian_samples == 11
    assert p.parse_args(["eval", "--samples", "12"]).test_samples == 12
    assert p.parse_args(["eval", "--test-samples", "13"]).test_samples == 13
    assert p.parse_args(["analyze", "--samples", "14"]).hessian_samples == 14
    assert p.parse_args(["analyze", "--hessian-samples", "15"]).hessian_samples == 15
    assert p.parse_args(["zeroq", "--no-eval"]).evaluate is False
    assert p.parse_args(["zeroq", "--no-evaluate"]).evaluate is False
    assert p.parse_args(["zeroq"]).evaluate is True
    assert p.parse_args(["zeroq", "--max-probes", "3"]).hessian_max_probes == 3
    assert p.parse_args(["compress", "--bops", "2.5"]).bops_limit == 2.5
    assert p.parse_args(["compress", "--bias-correct"]).bias_correct is True
    assert p.parse_args(["allocate", "--sensitivity", "s.json"]).sensitivity_file == "s.json"
    assert p.parse_args(["allocate", "--sensitivity-file", "s.json"]).sensitivity_file == "s.json"
    # the hidden spellings stay out of the help
    for command in ("compress", "eval", "analyze"):
        assert "--samples " not in _subparser(p, command).format_help()


def _subparser(parser, name):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices[name]
    raise AssertionError("no subcommands")


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action
    raise AssertionError("no subcommands")


def test_every_flag_of_every_subcommand_has_help():
    parser = build_parser()
    sub = _subparsers(parser)
    missing = [f"hawq {' / '.join(a.option_strings)}" for a in parser._actions
               if a.option_strings and not a.help]
    assert {c.dest for c in sub._choices_actions} == set(sub.choices)
    missing += [f"hawq {c.dest} (subcommand)" for c in sub._choices_actions if not c.help]
    for name, p in sub.choices.items():
        for a in p._actions:
            if not a.help:  # argparse.SUPPRESS (hidden old spellings) is a help value
                missing.append(f"hawq {name} {a.option_strings or a.dest}")
    assert not missing, f"flags without help: {missing}"


def test_version_and_python_m_hawq(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert hawq.__version__ in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "hawq", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "compress" in r.stdout and "zeroq" in r.stdout
    r = subprocess.run([sys.executable, "-m", "hawq", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and hawq.__version__ in r.stdout


# ----------------------------------------------------------------------------- registries

@pytest.mark.parametrize("make, names", [
    (lambda: CompressConfig(sensitivity="nope"), ["hawq-v2", "fisher", "hybrid"]),
    (lambda: CompressConfig(allocator="nope"), ["frontier", "ilp", "v1-rule", "cw-ddpg"]),
    (lambda: CompressConfig(method="nope"), ["hawq-v2", "cw-hessian"]),
    (lambda: CompressConfig(w_clip="nope"), ["minmax", "mse"]),
    (lambda: CompressConfig(task="nope"), ["classification", "causal-lm"]),
    (lambda: ZeroQConfig(allocator="v1-rule"), ["frontier", "ilp"]),
    (lambda: ZeroQConfig(sensitivity="nope"), ["kl", "hessian"]),
    (lambda: hawq.QuantConfig(w_clip="nope"), ["minmax", "mse"]),
    (lambda: __import__("hawq.modules.models").modules.models.get_spec("nope"), ["resnet20", "digits-cnn"]),
    (lambda: __import__("hawq.maths.allocation").maths.allocation.allocate(
        np.ones((2, 2)), [10, 10], [4, 8], None, method="nope"), ["frontier", "ilp", "v1-rule"]),
])
def test_unknown_registry_names_list_the_choices(make, names):
    with pytest.raises(ConfigError) as e:
        make()
    for n in names:
        assert n in str(e.value)


def test_a_registered_sensitivity_is_a_cli_choice_of_a_fresh_parser(monkeypatch):
    from hawq.analysis.sensitivities import SENSITIVITIES, register_sensitivity

    monkeypatch.setattr(SENSITIVITIES, "_items", dict(SENSITIVITIES._items))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--sensitivity", "const-test"])

    @register_sensitivity("const-test")
    def const(ctx):
        return np.ones((len(ctx.names), len(ctx.bits))), {}

    args = build_parser().parse_args(["compress", "--sensitivity", "const-test"])
    assert config_from_args(CompressConfig, args).sensitivity == "const-test"
    assert "const-test" in _subparser(build_parser(), "compress").format_help()


def test_a_registered_allocator_and_clip_method_are_valid_everywhere(monkeypatch):
    from hawq.maths.allocation import ALLOCATORS, allocate, omega_allocators, register_allocator
    from hawq.maths.quantizers import W_CLIPS, register_w_clip, weight_qparams

    monkeypatch.setattr(ALLOCATORS, "_items", dict(ALLOCATORS._items))
    monkeypatch.setattr(W_CLIPS, "_items", dict(W_CLIPS._items))

    @register_allocator("all-high")
    def all_high(problem):
        return allocate(problem.omega, problem.params, problem.bits, None, "frontier")

    @register_w_clip("half")
    def half(w, bits, symmetric, axis):
        return torch.full((w.shape[0],) if axis is not None else (), 0.5)

    assert "all-high" in omega_allocators()
    omega = np.array([[2.0, 1.0], [3.0, 1.0]])  # more bits, less cost
    assert allocate(omega, [10, 10], [4, 8], None, "all-high").bits == [8, 8]
    args = build_parser().parse_args(["compress", "--allocator", "all-high", "--w-clip", "half"])
    cfg = config_from_args(CompressConfig, args)
    assert (cfg.allocator, cfg.w_clip) == ("all-high", "half")
    assert ZeroQConfig(allocator="all-high").allocator == "all-high"
    w = torch.randn(4, 3)
    assert torch.allclose(weight_qparams(w, 4, clip="half").scale,
                          weight_qparams(w, 4).scale * 0.5)


# ----------------------------------------------------------------------------- loading

_MODULE = textwrap.dedent('''
    import torch
    import torch.nn as nn


    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


    def data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(48, 6, generator=g)
        return {"calib": (x, torch.randint(0, 3, (48,), generator=g)),
                "test": (x[:24], torch.randint(0, 3, (24,), generator=g))}


    def setup():
        return make(), "classification", data()


    def broken():
        raise RuntimeError("weights file missing")


    def needs(path):
        return make()
''')


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop("mymodels", None)


def test_hawq_layers_finds_a_module_in_the_current_folder(tmp_path):
    (tmp_path / "mymodels.py").write_text(_MODULE)
    commands = [[sys.executable, "-m", "hawq"]]
    script = Path(sys.executable).parent / "hawq"  # the console script, when installed
    if script.exists():
        commands.append([str(script)])
    for cmd in commands:
        r = subprocess.run([*cmd, "layers", "--model", "mymodels:make"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "2 quantizable layers" in r.stdout
        r = subprocess.run([*cmd, "layers", "--model", "nothere:make"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith("hawq: error: ") and len(r.stderr.strip().splitlines()) == 1
        assert "nothere" in r.stderr


def test_user_model_and_data_through_layers_eval_analyze(user_dir, capsys):
    assert main(["layers", "--model", "mymodels:make"]) == 0
    assert "2 quantizable layers" in capsys.readouterr().out
    assert main(["layers", "--model", "./mymodels.py:make", "--data", "mymodels:data"]) == 0
    assert main(["eval", "--model", "mymodels:setup", "--w-bits", "8", "--calib-samples",
                 "16", "--test-samples", "10"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "on 10 test samples" in out
    assert main(["analyze", "--model", "mymodels:make", "--data", "mymodels:data",
                 "--hessian-samples", "16", "--max-probes", "3"]) == 0
    assert "on 16 train samples" in capsys.readouterr().out


def test_compress_and_zeroq_hand_the_user_model_to_the_workflow(user_dir, monkeypatch, capsys):
    import hawq.workflows.workflow

    seen = {}

    def fake(model, data, *, task=None, config=None, out_dir=None, progress=False, **kw):
        seen.update(model=model, data=data, task=task, config=config, out_dir=out_dir)
        raise ConfigError("stop here")

    monkeypatch.setattr(hawq.workflows.workflow, "compress", fake)
    monkeypatch.setattr(hawq.workflows.workflow, "zeroq", fake)
    assert main(["compress", "--model", "mymodels:make", "--data", "mymodels:data",
                 "--task", "classification", "--method", "cw-hawq", "--episodes", "3"]) == 2
    assert capsys.readouterr().err.strip() == "hawq: error: stop here"
    assert isinstance(seen["model"], nn.Module) and set(seen["data"]) == {"calib", "test"}
    assert seen["config"].model == "mymodels:make" and seen["config"].data == "mymodels:data"
    assert (seen["config"].allocator, seen["config"].episodes) == ("cw-ddpg", 3)
    assert main(["compress", "--model", "mymodels:setup", "--task", "embedding"]) == 2
    assert seen["task"] == "embedding" and set(seen["data"]) == {"calib", "test"}
    assert main(["compress", "--model", "mymodels:setup"]) == 2
    assert seen["task"] == "classification"  # the factory's
    assert main(["compress"]) == 2  # built-in model: the workflow builds it with its data
    assert (seen["model"], seen["data"], seen["task"]) == (None, None, None)
    assert main(["zeroq", "--model", "mymodels:make", "--input-shape", "6"]) == 2
    assert isinstance(seen["model"], nn.Module) and seen["config"].input_shape == (6,)
    assert main(["compress", "--model", "mymodels:make"]) == 2  # no data: says what to give
    assert "--data" in capsys.readouterr().err


def test_load_object_errors_say_what_to_do(user_dir):
    from hawq.ui.loading import load_object

    cases = {"mymodels": "colon", "nothere:make": "current folder",
             "mymodels:nope": "has no attribute", "mymodels:broken": "weights file missing",
             "mymodels:needs": "arguments", "missing/file.py:make": "does not exist"}
    for spec, words in cases.items():
        with pytest.raises(ConfigError, match=words):
            load_object(spec, "model")
    assert isinstance(load_object("mymodels:make", "model"), nn.Module)
    assert isinstance(load_object(str(user_dir / "mymodels.py") + ":make", "model"), nn.Module)
    assert callable(load_object("mymodels:make", "model", call=False))


def test_unpack_setup_and_data_read_every_form():
    from hawq.ui.loading import unpack_data, unpack_setup

    m = nn.Linear(2, 2)
    x = torch.zeros(4, 2)
    assert unpack_setup(m).model is m
    s = unpack_setup({"model": m, "task": "embedding", "calib": x, "test": x})
    assert (s.model, s.task, sorted(s.data)) == (m, "embedding", ["calib", "test"])
    s = unpack_setup((m, "causal-lm"))
    assert (s.model, s.task, s.data) == (m, "causal-lm", {})
    s = unpack_setup((m, None, x))
    assert s.data["calib"] is x
    s = unpack_setup({"model": m, "data": {"calib": x, "heldout": x}})
    assert sorted(s.data) == ["calib", "heldout"]
    assert unpack_data(x)["calib"] is x
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert unpack_data(batch) == {"calib": batch}  # a dict of tensors is one data object
    for bad in ("text", [m], {"model": m, "extra": 1}, (1, 2, 3, 4)):
        with pytest.raises(ConfigError, match="nn.Module"):
            unpack_setup(bad)
    with pytest.raises(ConfigError, match="calib"):
        unpack_data({"calib": x, "input_ids": x})


# ----------------------------------------------------------------------------- errors

def test_errors_are_one_line_without_traceback(capsys):
    assert main(["compress", "--target-avg-bits", "3", "--target-compression", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hawq: error: give one size target") and err.count("\n") == 1
    assert main(["compress", "--data", "nocolon"]) == 2
    assert "data='nocolon'" in capsys.readouterr().err
    assert issubclass(ConfigError, HawqError)

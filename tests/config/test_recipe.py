"""Recipe loading: built-ins, overrides, ${VAR} expansion, and one-line error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from smcp_core.config.recipe import (
    Recipe,
    builtin_recipe_names,
    load_recipe,
    resolved_dump,
)
from smcp_core.errors import SmcpError

ENV = {"IMAGENET_ROOT": "/tmp/imagenet"}


def load(spec="quickstart", overrides=(), env=None):
    return load_recipe(spec, list(overrides), env=ENV if env is None else env)


def error(spec="quickstart", overrides=(), env=None, *names: str) -> str:
    """Load expecting an SmcpError; check it is one line naming every given key; return it."""
    with pytest.raises(SmcpError) as info:
        load(spec, overrides, env)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    assert "Traceback" not in msg and "validation error" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- built-ins


def test_builtin_names():
    assert builtin_recipe_names() == ["quickstart", "cifar10_resnet56_2x", "rn50_fps2x"]


@pytest.mark.parametrize("name", ["quickstart", "cifar10_resnet56_2x", "rn50_fps2x"])
def test_builtin_recipes_load(name):
    r = load(name)
    assert isinstance(r, Recipe)
    assert r.name == name
    assert r.source is not None and Path(r.source).name == f"{name}.yaml"
    assert r.source_label == f"{name}.yaml"
    assert r.target_kind() == "speedup"
    p = r.prune
    assert p.warmup_epochs + p.ramp_epochs + p.cooldown_epochs <= p.epochs


def test_none_is_quickstart():
    r = load_recipe(None, env={})
    assert r.name == "quickstart"
    assert r == load("quickstart")


def test_quickstart_values():
    r = load("quickstart", env={})
    assert r.model.source == "cifar/resnet20"
    assert r.model.kwargs == {"in_channels": 1}
    assert r.model.checkpoint is None
    assert r.model.num_classes == 10
    assert (r.data.source, r.data.image_size, r.data.batch_size) == ("digits", 32, 64)
    assert (r.prune.epochs, r.prune.warmup_epochs, r.prune.ramp_epochs, r.prune.cooldown_epochs) == (12, 5, 4, 3)
    assert r.prune.update_interval_samples == 2048
    assert r.prune.optimizer.lr == 0.1
    assert r.target_value() == 1.5
    assert (r.profile.backend, r.profile.batch_size, r.profile.channel_step) == ("onnxruntime", 32, 4)
    assert r.export.batch_size == 32 and r.export_batch_size() == 32
    assert r.export_backend() == "onnxruntime"


def test_cifar_recipe_uses_shared_data_default_and_env():
    r = load("cifar10_resnet56_2x", env={})
    assert r.model.source == "cifar/resnet56"
    assert r.model.checkpoint == "../shared/data/models/resnet56-4bfd9763.th"
    assert r.data.path == "../shared/data/cifar10/cifar10_jpeg.npz"
    assert r.data.val_source == "cifar10"
    assert r.data.val_path == "../shared/data/cifar10/cifar10_exact_subset.npz"
    assert r.prune.layer_pruning and r.prune.channel_round == 16 and r.prune.min_channels == 16
    assert r.prune.target_margin == 0.1 and r.prune.closed_loop == 2
    assert r.prune.optimizer.lr == 0.02 and r.prune.optimizer.weight_decay == 1e-4
    # issue 20's re-tune: the full 50k training set, 2 epochs of pruning + 3 of recovery, distilled
    assert r.data.train_subset is None and (r.prune.epochs, r.prune.ramp_epochs, r.prune.cooldown_epochs) == (5, 2, 3)
    assert r.prune.distill.enabled and r.prune.distill.alpha == 0.7
    assert r.export_batch_size() == 1
    r = load("cifar10_resnet56_2x", env={"SMCP_SHARED_DATA": "/data"})
    assert r.model.checkpoint == "/data/models/resnet56-4bfd9763.th"
    assert r.data.path == "/data/cifar10/cifar10_jpeg.npz"


def test_benchmarks_short_recipe_keeps_the_schedule_its_tables_were_published_with():
    # benchmarks/_cifar_common.py's base: the built-in recipe before issue 20's re-tune
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "recipes" / "cifar10_resnet56_short.yaml"
    r = load(str(path), env={})
    assert r.name == "cifar10_resnet56_short" and r.model.source == "cifar/resnet56"
    assert r.data.train_subset == 10000 and r.prune.optimizer.lr == 0.005 and not r.prune.distill.enabled
    assert (r.prune.epochs, r.prune.warmup_epochs, r.prune.ramp_epochs, r.prune.cooldown_epochs) == (16, 1, 8, 7)
    assert r.prune.target_margin == 0.1 and r.prune.closed_loop == 2 and r.prune.channel_round == 16


def test_rn50_recipe():
    r = load("rn50_fps2x", env={"IMAGENET_ROOT": "/x", "RN50_CHECKPOINT": "/w/rn50.pth"})
    assert r.data.path == "/x"
    assert r.model.checkpoint == "/w/rn50.pth"
    assert (r.profile.backend, r.profile.device, r.profile.dtype, r.profile.layout) == (
        "tensorrt", "cuda", "float16", "nchw")
    assert (r.prune.epochs, r.prune.warmup_epochs, r.prune.ramp_epochs, r.prune.cooldown_epochs) == (90, 10, 55, 25)
    assert r.prune.optimizer.momentum == 0.875
    assert r.prune.optimizer.weight_decay == 3.0517578125e-5
    assert r.prune.lr_schedule.warmup_epochs == 8
    assert r.prune.amp and r.prune.channels_last and r.prune.device == "cuda"
    assert r.export.formats == ["onnx", "trt"] and r.export.trt_precision == "fp16"
    assert load("rn50_fps2x", env={"IMAGENET_ROOT": "/x"}).model.checkpoint == "resnet50.pth"


def test_builtin_by_file_name_and_path(tmp_path, monkeypatch):
    assert load("quickstart.yaml").name == "quickstart"
    # ./recipes/<name>.yaml is found by bare name too
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("name: mine\n")
    r = load("mine")
    assert r.name == "mine" and r.source_label == "recipes/mine.yaml"
    # and a path to a file
    r = load("recipes/mine.yaml")
    assert r.name == "mine"


def test_name_defaults_to_file_stem(tmp_path):
    r = load(write(tmp_path, "seed: 3\n", "my_exp.yaml"))
    assert r.name == "my_exp" and r.seed == 3
    assert r.target_kind() == "speedup" and r.target_value() == 2.0  # schema default


# ----------------------------------------------------------------------------- overrides


def test_overrides_of_each_kind():
    r = load("quickstart", [
        "prune.epochs=20",                        # int
        "prune.target.speedup=1.75",              # float
        "prune.layer_pruning=true",               # bool
        "prune.masking=hard",                     # literal string
        "model.unpruned=[conv1, fc]",             # list
        "model.kwargs={in_channels: 1, width: 2}",  # mapping
        "model.kwargs.depth=3",                   # key inside a free-form mapping
        "data.path=null",                         # null
        "data.path=/some/where",                  # later override wins
        "prune.optimizer.weight_decay=1e-4",      # exponent without a dot is a number
        "model.input_size=[1, 32, 32]",
    ])
    assert r.prune.epochs == 20
    assert r.prune.target.speedup == 1.75
    assert r.prune.layer_pruning is True
    assert r.prune.masking == "hard"
    assert r.model.unpruned == ["conv1", "fc"]
    assert r.model.kwargs == {"in_channels": 1, "width": 2, "depth": 3}
    assert r.data.path == "/some/where"
    assert r.prune.optimizer.weight_decay == 1e-4
    assert r.model.input_size == [1, 32, 32]
    assert r.overrides[0] == "prune.epochs=20"


def test_override_null_and_single_string_list():
    r = load("cifar10_resnet56_2x", ["data.val_path=null", "model.unpruned=fc", "export.formats=trt"], env={})
    assert r.data.val_path is None
    assert r.model.unpruned == ["fc"]
    assert r.export.formats == ["trt"]


def test_override_replaces_variable_that_is_not_set():
    r = load("rn50_fps2x", ["data.path=/data/imagenet"], env={})
    assert r.data.path == "/data/imagenet"


def test_override_values_are_expanded():
    r = load("quickstart", ["data.path=${ROOT}/digits"], env={"ROOT": "/r"})
    assert r.data.path == "/r/digits"


def test_override_without_equals():
    error("quickstart", ["prune.epochs"], None, "prune.epochs", "KEY=VALUE")


def test_override_unparsable_value():
    error("quickstart", ["model.unpruned=[conv1"], None, "model.unpruned")


def test_override_unknown_key_suggests():
    msg = error("quickstart", ["prune.epoch=3"], None, "prune.epoch", "did you mean prune.epochs?")
    assert msg.startswith("recipe quickstart.yaml: ")


def test_override_unknown_key_lists_valid_keys():
    msg = error("quickstart", ["prune.target.zzz=3"], None, "prune.target.zzz")
    assert "speedup, latency_ms, flops_ratio" in msg


def test_override_key_in_other_section_suggested():
    error("quickstart", ["prune.batch_size=3"], None, "prune.batch_size", "data.batch_size")


def test_override_below_a_leaf():
    error("quickstart", ["prune.epochs.x=3"], None, "prune.epochs")


# ----------------------------------------------------------------------------- targets


def test_set_switches_target_kind():
    r = load("quickstart", ["prune.target.latency_ms=4.5"])
    assert r.target_kind() == "latency_ms" and r.target_value() == 4.5
    assert r.prune.target.speedup is None and r.prune.target.flops_ratio is None
    r = load("quickstart", ["prune.target.latency_ms=4.5", "prune.target.flops_ratio=0.5"])
    assert r.target_kind() == "flops_ratio" and r.prune.target.latency_ms is None
    r = load("quickstart", ["prune.target={latency_ms: 3}"])
    assert r.target_kind() == "latency_ms"


def test_two_targets_in_file_is_an_error(tmp_path):
    spec = write(tmp_path, "prune:\n  target:\n    speedup: 2.0\n    latency_ms: 5\n")
    msg = error(spec, (), None, "prune.target", "exactly one", "speedup", "latency_ms")
    assert msg.startswith(f"recipe {spec}: ")


def test_no_target_is_an_error():
    error("quickstart", ["prune.target.speedup=null"], None, "prune.target", "exactly one")


def test_target_in_file_alone(tmp_path):
    r = load(write(tmp_path, "prune:\n  target:\n    flops_ratio: 0.4\n"))
    assert r.target_kind() == "flops_ratio" and r.target_value() == 0.4


@pytest.mark.parametrize("override,key,words", [
    ("prune.target.speedup=-1", "prune.target.speedup", "greater than 1"),
    ("prune.target.speedup=1", "prune.target.speedup", "greater than 1"),
    ("prune.target.latency_ms=0", "prune.target.latency_ms", "greater than 0"),
    ("prune.target.flops_ratio=1.5", "prune.target.flops_ratio", "less than 1"),
    ("prune.target.flops_ratio=0", "prune.target.flops_ratio", "greater than 0"),
])
def test_target_ranges(override, key, words):
    error("quickstart", [override], None, key, words)


def test_speedup_message_exact():
    msg = error("quickstart", ["prune.target.speedup=-1"])
    assert msg == "recipe quickstart.yaml: prune.target.speedup = -1: must be greater than 1 (a speed-up such as 2.0)"


# ----------------------------------------------------------------------------- env expansion


def test_env_expansion_and_defaults(tmp_path):
    spec = write(tmp_path, (
        "name: ${NAME:-fallback}\n"
        "model:\n  checkpoint: ${CKPT}\n  unpruned: ['${LAYER:-fc}', conv1]\n"
        "data:\n  path: ${ROOT}/train\n  val_path: ${EMPTY:-default_val}\n  batch_size: ${BS:-32}\n"
    ))
    r = load(spec, env={"CKPT": "/w.pth", "ROOT": "/d", "EMPTY": ""})
    assert r.name == "fallback"
    assert r.model.checkpoint == "/w.pth"
    assert r.model.unpruned == ["fc", "conv1"]
    assert r.data.path == "/d/train"
    assert r.data.val_path == "default_val"  # ${VAR:-x}: empty counts as unset
    assert r.data.batch_size == 32
    r = load(spec, env={"CKPT": "c", "ROOT": "r", "NAME": "n", "BS": "16"})
    assert r.name == "n" and r.data.batch_size == 16


def test_env_defaults_to_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCP_TEST_ROOT", "/from/environ")
    r = load_recipe(write(tmp_path, "data:\n  path: ${SMCP_TEST_ROOT}\n"))
    assert r.data.path == "/from/environ"


def test_env_missing_variable():
    msg = error("rn50_fps2x", (), {}, "data.path", "${IMAGENET_ROOT}", "export IMAGENET_ROOT=")
    assert msg == ("recipe rn50_fps2x.yaml: data.path uses ${IMAGENET_ROOT}, which is not set; "
                   "export IMAGENET_ROOT=/path/to/imagenet or pass --set data.path=...")


def test_env_missing_variable_label_is_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    src = Path(__file__).resolve().parents[2] / "recipes" / "rn50_fps2x.yaml"
    (tmp_path / "recipes" / "rn50_fps2x.yaml").write_text(src.read_text())
    msg = error("recipes/rn50_fps2x.yaml", (), {})
    assert msg.startswith("recipe recipes/rn50_fps2x.yaml: data.path uses ${IMAGENET_ROOT}")


def test_env_missing_in_list_names_index(tmp_path):
    error(write(tmp_path, "model:\n  unpruned: [fc, '${NOPE}']\n"), (), {}, "model.unpruned[1]", "${NOPE}")


def test_env_malformed_reference(tmp_path):
    error(write(tmp_path, "data:\n  path: ${ROOT/x\n"), (), {}, "data.path", "malformed")


def test_dollar_escape(tmp_path):
    r = load(write(tmp_path, "data:\n  path: /a/$${NOT_A_VAR}/$x\n"), env={})
    assert r.data.path == "/a/${NOT_A_VAR}/$x"


# ----------------------------------------------------------------------------- schema errors


def test_unknown_key_in_file(tmp_path):
    spec = write(tmp_path, "prune:\n  epoch: 30\n")
    msg = error(spec, (), None, "prune.epoch", "did you mean prune.epochs?")
    assert msg == f"recipe {spec}: unknown key prune.epoch (did you mean prune.epochs?)"


def test_unknown_top_level_key(tmp_path):
    error(write(tmp_path, "prunning:\n  epochs: 3\n"), (), None, "prunning", "did you mean prune?")
    error(write(tmp_path, "zzzz: 1\n"), (), None, "zzzz", "valid keys: name, seed, model")


def test_unknown_nested_key(tmp_path):
    error(write(tmp_path, "prune:\n  optimizer:\n    learning_rate: 0.1\n"), (), None,
          "prune.optimizer.learning_rate", "valid keys under prune.optimizer")


def test_free_form_kwargs_accept_any_key(tmp_path):
    r = load(write(tmp_path, "model:\n  kwargs: {in_channels: 1, anything: [1, 2], eps: 1e-3}\n"))
    assert r.model.kwargs == {"in_channels": 1, "anything": [1, 2], "eps": 1e-3}


@pytest.mark.parametrize("override,key,words", [
    ("prune.epochs=abc", "prune.epochs", "whole number"),
    ("prune.epochs=2.5", "prune.epochs", "whole number"),
    ("prune.epochs=true", "prune.epochs", "number"),
    ("prune.optimizer.lr=fast", "prune.optimizer.lr", "number"),
    ("prune.amp=maybe", "prune.amp", "true or false"),
    ("model.unpruned=3", "model.unpruned", "list"),
    ("model.kwargs=[1]", "model.kwargs", "mapping"),
    ("prune=3", "prune", "mapping"),
    ("model.input_size=[3, 32]", "model.input_size", "[C, H, W]"),
    ("model.input_size=[3, x, 32]", "model.input_size[1]", "whole number"),
])
def test_wrong_types(override, key, words):
    msg = error("quickstart", [override], None, key, words)
    assert msg.startswith("recipe quickstart.yaml: ")


def test_literal_message_exact():
    msg = error("quickstart", ["prune.masking=sofft"])
    assert msg == "recipe quickstart.yaml: prune.masking = 'sofft': must be one of soft, hard, permanent"


@pytest.mark.parametrize("override,key,words", [
    ("data.batch_size=0", "data.batch_size", "at least 1"),
    ("data.workers=-1", "data.workers", "at least 0"),
    ("prune.label_smoothing=1", "prune.label_smoothing", "less than 1"),
    ("prune.importance.momentum=-0.1", "prune.importance.momentum", "at least 0"),
    ("prune.cost_weight=1.5", "prune.cost_weight", "at most 1"),
    ("prune.optimizer.lr=0", "prune.optimizer.lr", "greater than 0"),
    ("prune.channel_round=0", "prune.channel_round", "at least 1"),
    ("profile.max_seconds=0", "profile.max_seconds", "greater than 0"),
    ("profile.max_seconds=.nan", "profile.max_seconds", "finite"),
    ("export.opset=17", "export.opset", "at least 18"),
    ("export.formats=[onnx, tflite]", "export.formats[1]", "one of onnx, trt"),
    ("export.formats=[]", "export.formats", "at least one"),
    ("data.source=mnist", "data.source", "one of digits, cifar10"),
    ("profile.device=gpu", "profile.device", "cpu, cuda or cuda:N"),
    ("prune.device=cuda:x", "prune.device", "cuda:N"),
    ("model.source=cifar/resnet21", "model.source", "cifar/resnet20"),
    ("model.source=resnet50", "model.source", "torchvision/<name>"),
    ("prune.method=l3", "prune.method", "one of smcp, halp, l1, sfp, uniform"),
    ("profile.backend=tensorrt", "profile", "device cuda"),
])
def test_out_of_range(override, key, words):
    error("quickstart", [override], None, key, words)


def test_valid_model_sources():
    for src in ["torchvision/resnet50", "cifar/resnet110", "mobilenet_v1", "models/my_net.py:build"]:
        assert load("quickstart", [f"model.source={src}"]).model.source == src
    assert load("quickstart", ["prune.device=cuda:1", "profile.device=cuda"]).prune.device == "cuda:1"


def test_epoch_phases_exceed_total():
    msg = error("quickstart", ["prune.epochs=10"], None,
                "prune", "warmup_epochs", "ramp_epochs", "cooldown_epochs", "epochs = 10")
    assert "5 + 4 + 3 = 12" in msg
    assert load("quickstart", ["prune.epochs=20"]).prune.epochs == 20  # extra epochs are fine


def test_null_section_means_defaults(tmp_path):
    r = load(write(tmp_path, "prune:\nexport:\n"))
    assert r.prune.epochs == 10 and r.export.formats == ["onnx"]


# ----------------------------------------------------------------------------- file errors


def test_yaml_syntax_error(tmp_path):
    spec = write(tmp_path, "prune:\n  epochs: [3\n")
    msg = error(spec, (), None, spec, "YAML syntax error", "line 3", "column")
    error(write(tmp_path, "a: b: c\n"), (), None, "line 1, column 5")
    assert msg


def test_yaml_duplicate_key(tmp_path):
    error(write(tmp_path, "prune:\n  epochs: 3\n  epochs: 4\n"), (), None, "duplicate key 'epochs'", "line 3")


def test_missing_file():
    msg = error("x.yaml")
    assert msg == "recipe file not found: x.yaml (built-in recipes: quickstart, cifar10_resnet56_2x, rn50_fps2x)"
    error("quickstrat", (), None, "recipe file not found: quickstrat", "did you mean quickstart?")
    error(Path("nowhere/r.yaml"), (), None, "nowhere/r.yaml")


def test_directory_instead_of_file(tmp_path):
    error(str(tmp_path), (), None, "directory")


@pytest.mark.parametrize("text,words", [
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("just a string\n", "top level must be a mapping"),
    ("", "empty"),
    ("# nothing\n", "empty"),
])
def test_top_level_not_a_mapping(tmp_path, text, words):
    spec = write(tmp_path, text)
    error(spec, (), None, spec, words)


# ----------------------------------------------------------------------------- resolved dump


@pytest.mark.parametrize("name,overrides", [
    ("quickstart", []),
    ("cifar10_resnet56_2x", ["prune.target.flops_ratio=0.5", "model.unpruned=[conv1, 'layer3.*']"]),
    ("rn50_fps2x", ["data.path=/d/$$weird"]),
])
def test_resolved_dump_round_trips(tmp_path, name, overrides):
    r = load(name, overrides)
    text = resolved_dump(r)
    spec = write(tmp_path, text, "resolved.yaml")
    r2 = load_recipe(spec, env={})  # fully resolved: needs no environment
    assert r2 == r
    def body(t):
        return [line for line in t.splitlines() if not line.startswith("#")]

    assert body(resolved_dump(r2)) == body(text)  # dumping again gives the same YAML
    for section in ("name:", "model:", "data:", "profile:", "prune:", "export:", "  target:"):
        assert section in text


def test_resolved_dump_keeps_dollar(tmp_path):
    r = load("quickstart", ["data.path=/a/$${X}/b"], env={})
    assert r.data.path == "/a/${X}/b"
    r2 = load_recipe(write(tmp_path, resolved_dump(r)), env={})
    assert r2.data.path == "/a/${X}/b" and r2 == r


def test_recipe_equality_ignores_source(tmp_path):
    a = load("quickstart")
    b = load(write(tmp_path, resolved_dump(a)))
    assert a.source != b.source and a == b
    assert a != load("quickstart", ["seed=1"])

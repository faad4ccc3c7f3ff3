import pytest

from visiontrain.config import all_keys, build_config, load_config, suggest_key
from visiontrain.errors import ConfigError


def test_defaults_resolve():
    cfg = build_config()
    assert cfg.data.name == "defects"
    assert cfg.train.precision == "32"
    assert "optim.lr" in all_keys()


def test_overrides_are_yaml_scalars_and_lists():
    cfg = build_config(
        overrides=[
            "optim.lr=3e-4",
            "train.precision=bf16",
            "loss.class_weights=[1, 2.5]",
            "train.early_stopping.patience=3",
        ]
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.precision == "bf16"
    assert cfg.loss.class_weights == [1.0, 2.5]
    assert cfg.train.early_stopping.patience == 3


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown key `optim.lrr` — did you mean `optim.lr`\?"):
        build_config(overrides=["optim.lrr=0.1"])
    assert suggest_key("train.lr") == "optim.lr"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lr=-1", "`optim.lr` = -1"),
        ("optim.lr=0", "`optim.lr` = 0"),
        ("train.epochs=-3", "`train.epochs` = -3"),
        ("data.batch_size=0", "`data.batch_size` = 0"),
        ("data.image_size=1000000", "`data.image_size` = 1000000"),
        ("train.epochs=ten", "`train.epochs` = 'ten'"),
        ("train.precision=fp8", "`train.precision` = 'fp8'"),
    ],
)
def test_bad_values_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=[override])
    assert fragment in str(info.value)


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        build_config(overrides=["optim.lr"])


def test_yaml_object_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("optim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="Python object tags are refused"):
        load_config(path)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_value_is_not_a_section():
    with pytest.raises(ConfigError, match=r"`optim\.lr`"):
        build_config(overrides=["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        build_config({"optim": {"lr": 0.1}}, overrides=["optim.lr.x=1"])


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"defects", "digits", "imagefolder", "mnist", "cifar10"}
    for path in configs:
        load_config(path)


def test_config_roundtrips_through_yaml():
    import yaml

    cfg = build_config(overrides=["optim.lr=0.01", "train.grad_clip_norm=1.0"])
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_every_key_is_documented():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    sections = {
        "data",
        "model",
        "loss",
        "optim",
        "schedule",
        "train",
        "run",
        "train.early_stopping",
    }
    missing = [k for k in all_keys() if k not in sections and f"`{k}`" not in text]
    assert not missing


def test_defects_yaml_is_the_no_argument_default():
    from pathlib import Path

    shipped = load_config(Path(__file__).parents[1] / "configs" / "defects.yaml")
    assert shipped == build_config()

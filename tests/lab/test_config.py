import pytest

from layerwise.lab import config as C


def test_toml_round_trip_and_overrides(tmp_path):
    cfg = C.resolve("quick", None, ["optim.lr=1e-3", "train.seed=7", "data.corpus=/tmp/x.txt", "decay.name=alphadecay"])
    assert cfg.optim.lr == 1e-3 and cfg.train.seed == 7 and cfg.data.corpus == "/tmp/x.txt"
    path = tmp_path / "c.toml"
    path.write_text(C.to_toml(cfg))
    assert C.load_toml(path).to_dict() == cfg.to_dict()


def test_unknown_keys_and_wrong_types_name_the_key(tmp_path):
    with pytest.raises(C.ConfigError, match=r"optim\.lrr"):
        C.resolve(None, None, ["optim.lrr=1"])
    with pytest.raises(C.ConfigError, match=r"unknown config section"):
        C.resolve(None, None, ["optimizer.lr=1"])
    with pytest.raises(C.ConfigError, match=r"train\.max_steps: expected an integer"):
        C.resolve(None, None, ["train.max_steps=1.5"])
    with pytest.raises(C.ConfigError, match=r"train\.compile: expected true/false"):
        C.resolve(None, None, ["train.compile=yes"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_step = 10\n")
    with pytest.raises(C.ConfigError, match=r"bad\.toml.*train\.max_step"):
        C.load_toml(bad)
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.preset("nope")
    with pytest.raises(C.ConfigError, match="section.key=value"):
        C.parse_override("lr=3")


def test_int_is_accepted_for_float():
    cfg = C.resolve(None, None, ["optim.weight_decay=0"])
    assert isinstance(cfg.optim.weight_decay, float)

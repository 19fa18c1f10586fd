"""GradAug's options: one definition of the defaults, one validation, every front end's spelling."""
import dataclasses

import pytest
from detectron2.config import get_cfg
from omegaconf import OmegaConf

from gradaug_det.config import add_gradaug_config
from gradaug_det.engine.lazy import gradaug_enabled, lazy_gradaug_options, needs_unused_parameter_search_lazy
from gradaug_det.engine.trainer import needs_unused_parameter_search, validate_config
from gradaug_det.gradaug import GradAugOptions, SubnetSampler
from gradaug_det.gradaug.options import LAZY_KEYS, MMDET_KEYS, SAMPLER_KEYS


def yacs_cfg(**gradaug):
    cfg = add_gradaug_config(get_cfg())
    cfg.GRADAUG.ENABLED = True
    for k, v in gradaug.items():
        cfg.GRADAUG[k] = v
    return cfg


def lazy_cfg(run_seed=-1, **gradaug):
    return OmegaConf.create({"gradaug": dict(enabled=True, **gradaug), "train": {"seed": run_seed}})


def mmdet_options(**gradaug):
    # what GradAugDetectorMixin.__init__ does with model.gradaug
    return GradAugOptions.from_dict(gradaug, "model.gradaug.", MMDET_KEYS)


def test_yacs_defaults_are_the_options_defaults():
    g = add_gradaug_config(get_cfg()).GRADAUG
    fields = [f.name for f in dataclasses.fields(GradAugOptions) if f.name != "key_prefix"]
    assert sorted(g.keys()) == sorted(f.upper() for f in fields)  # every option is a yacs key, and back
    defaults = GradAugOptions()
    for name in fields:
        assert g[name.upper()] == getattr(defaults, name), name
    assert GradAugOptions.from_yacs(add_gradaug_config(get_cfg())) == defaults
    # the reference's ImageNet setting
    assert (defaults.num_subnets, defaults.min_width, defaults.max_width, defaults.subnet_loss) == (3, 0.9, 1.0, "soft")
    assert defaults.scales == (1.0, 0.857, 0.714, 0.571) and not defaults.enabled


def test_front_ends_read_the_same_keys():
    assert set(LAZY_KEYS) == {f.name for f in dataclasses.fields(GradAugOptions)} - {"key_prefix", "depth_eval_scale"}
    assert set(MMDET_KEYS) == set(LAZY_KEYS) - {"enabled"}
    assert set(SAMPLER_KEYS) < set(MMDET_KEYS)
    # the same values give the same options, whichever front end reads them
    values = dict(num_subnets=2, min_width=0.5, sampling="depth", depth_min_keep=0.6, transform="scale_rotate",
                  scales=[1.0, 0.5], rotation=[-5.0, 5.0], subnet_loss="gt+soft", soft_weight=0.5, seed=4)
    from_yacs = GradAugOptions.from_yacs(yacs_cfg(**{k.upper(): v for k, v in values.items()}))
    from_lazy = lazy_gradaug_options(lazy_cfg(**values))
    from_mmdet = mmdet_options(**values)
    assert from_yacs == from_lazy == dataclasses.replace(from_mmdet, enabled=True)
    assert from_yacs.scales == (1.0, 0.5) and from_yacs.rotation == (-5.0, 5.0)  # lists become tuples


@pytest.mark.parametrize("front_end, key", [
    ("yacs", "GRADAUG.SUBNET_LOSS"), ("lazy", "gradaug.subnet_loss"), ("mmdet", "model.gradaug.subnet_loss")])
def test_subnet_loss_is_validated_once_in_the_callers_spelling(front_end, key, monkeypatch):
    cfg = {"yacs": lambda: yacs_cfg(SUBNET_LOSS="kl"), "lazy": lambda: lazy_cfg(subnet_loss="kl"),
           "mmdet": lambda: {"subnet_loss": "kl"}}[front_end]()
    # the entry points: the trainer / train_net's setup, the LazyConfig tool, the mmdet detector
    entry = {"yacs": validate_config, "lazy": gradaug_enabled, "mmdet": lambda d: mmdet_options(**d)}[front_end]
    calls = []
    validate = GradAugOptions.validate
    monkeypatch.setattr(GradAugOptions, "validate", lambda self: calls.append(1) or validate(self))
    with pytest.raises(ValueError) as e:
        entry(cfg)
    assert str(e.value) == f"{key}='kl' is invalid: allowed soft, gt, gt+soft"
    assert calls == [1]  # one validation, the options object's


@pytest.mark.parametrize("values, yacs, lower", [
    (dict(num_subnets=0), "GRADAUG.NUM_SUBNETS=0 is invalid: must be an integer >= 1", "num_subnets=0"),
    (dict(min_width=0.95, max_width=0.9), "GRADAUG.MIN_WIDTH=0.95 is invalid: must be <= GRADAUG.MAX_WIDTH (0.9)",
     "min_width=0.95 is invalid: must be <= {p}max_width (0.9)"),
    (dict(sampling="channels"), "GRADAUG.SAMPLING='channels' is invalid: allowed: width, depth", "sampling='channels'"),
    (dict(gt_weight=-1.0), "GRADAUG.GT_WEIGHT=-1.0 is invalid: a loss weight must be a finite number >= 0",
     "gt_weight=-1.0"),
    (dict(seed=-2), "GRADAUG.SEED=-2 is invalid: must be an integer >= 0, or -1 to derive it from the run's seed",
     "seed=-2"),
])
def test_errors_name_the_key_value_and_what_is_allowed(values, yacs, lower):
    with pytest.raises(ValueError) as e:
        validate_config(yacs_cfg(**{k.upper(): v for k, v in values.items()}))
    assert str(e.value) == yacs
    for prefix, make in (("gradaug.", lambda: gradaug_enabled(lazy_cfg(**values))),
                         ("model.gradaug.", lambda: mmdet_options(**values))):
        with pytest.raises(ValueError) as e:
            make()
        assert str(e.value).startswith(prefix + lower.format(p=prefix)), str(e.value)


def test_unknown_keys_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"^gradaug has unknown keys \['sampler'\]; allowed: .*'num_subnets'"):
        lazy_gradaug_options(OmegaConf.create({"gradaug": {"enabled": True, "sampler": {"num_subnets": 3}}}))
    with pytest.raises(ValueError, match=r"^model.gradaug has unknown keys \['enabled'\]"):
        mmdet_options(enabled=True)  # an mmdet GradAug detector always runs GradAug
    with pytest.raises(TypeError, match=r"unknown options \['subnet_loss'\]"):
        SubnetSampler(subnet_loss="gt")  # not a sampler option
    assert not gradaug_enabled(OmegaConf.create({"train": {}}))  # no gradaug node: off


@pytest.mark.parametrize("sampling", ["width", "depth"])
@pytest.mark.parametrize("subnet_loss", ["soft", "gt", "gt+soft"])
def test_one_find_unused_parameters_rule_for_every_front_end(sampling, subnet_loss):
    reason = GradAugOptions(sampling=sampling, subnet_loss=subnet_loss).unused_parameters_reason()
    assert (reason is not None) == (sampling == "depth" or subnet_loss == "soft")
    assert needs_unused_parameter_search(yacs_cfg(SAMPLING=sampling, SUBNET_LOSS=subnet_loss)) == reason
    assert needs_unused_parameter_search_lazy(lazy_cfg(sampling=sampling, subnet_loss=subnet_loss)) == reason
    # mmdet's GradAugDetectorMixin.needs_unused_parameters is `reason is not None` of its options
    assert mmdet_options(sampling=sampling, subnet_loss=subnet_loss).unused_parameters_reason() == reason
    off = yacs_cfg(SAMPLING=sampling, SUBNET_LOSS=subnet_loss)
    off.GRADAUG.ENABLED = False
    assert needs_unused_parameter_search(off) is None


def test_sampler_seed_minus_one_derives_from_the_run_seed():
    draws = [SubnetSampler(seed=s).sample() for s in (0, 5)]
    cfg = yacs_cfg()
    cfg.SEED = 5
    assert SubnetSampler.from_config(cfg).sample() == draws[1]  # GRADAUG.SEED -1: SEED
    cfg.GRADAUG.SEED = 0
    assert SubnetSampler.from_config(cfg).sample() == draws[0]
    assert SubnetSampler().sample() == draws[0]  # no run seed: 0
    assert mmdet_options().sampler_seed() == 0
    assert lazy_gradaug_options(lazy_cfg(run_seed=5)).sampler_seed(5) == 5


def test_sampler_reads_the_options():
    o = GradAugOptions(num_subnets=2, min_width=0.5, smallest_subnet=False, transform="rotate", rotation=(1, 2))
    s = SubnetSampler(o, seed=3)
    assert (s.num_subnets, s.min_width, s.smallest, s.transform, s.rotation) == (2, 0.5, False, "rotate", (1.0, 2.0))
    assert SubnetSampler(o, seed=3).sample() == SubnetSampler(num_subnets=2, min_width=0.5, smallest_subnet=False,
                                                              transform="rotate", rotation=(1, 2), seed=3).sample()
    with pytest.raises(ValueError, match=r"^model\.gradaug\.min_width=0\.0"):  # overrides keep the spelling
        SubnetSampler(mmdet_options(), min_width=0.0)

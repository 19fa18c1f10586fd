"""Bad weight files for the loading tests: each is a file a user could pass."""
import collections
import os
import pickle

import numpy as np
import pytest
import torch


class FileCreator:
    """An object whose unpickling creates a file (what a malicious checkpoint can do)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def write_malicious(path, target, fmt):
    """A weights file whose full unpickling creates ``target``."""
    payload = {"model": {"backbone.bottom_up.stem.conv1.weight": np.zeros((1,), np.float32)},
               "__author__": "x", "evil": FileCreator(str(target))}
    if fmt == "pkl":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        payload["model"] = {k: torch.as_tensor(v) for k, v in payload["model"].items()}
        torch.save(payload, path)
    return path


@pytest.fixture
def malicious(tmp_path):
    """``make(fmt, name=None)`` -> (path of the file, the path its unpickling would create)."""

    def make(fmt, name=None):
        target = tmp_path / f"created_by_{fmt}"
        path = tmp_path / (name or f"evil.{fmt}")
        write_malicious(str(path), target, fmt)
        return str(path), target

    return make


def d2_pkl(path, state, protocol=pickle.HIGHEST_PROTOCOL, author="gradaug-det", **extra):
    """A detectron2-format .pkl of numpy arrays."""
    data = {"model": collections.OrderedDict((k, np.asarray(v)) for k, v in state.items()),
            "__author__": author, **extra}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return str(path)

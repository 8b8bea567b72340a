"""Loading a model is safe under threads: a server loads and builds in threads at once.

Loading skips random initialisation (a file replaces every tensor). It must do so for the loading thread alone:
a module another thread builds meanwhile is initialised as usual, and ``torch.nn.init`` is never left changed.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from aikd.models import build_backbone, load_backbone, save_checkpoint

LOADS, LOADERS, LAYERS = 24, 4, 300


def _initialised_like_torch(layer: nn.Linear) -> bool:
    """nn.Linear's default: weights U[-1/sqrt(fan_in), 1/sqrt(fan_in)] (std bound/sqrt(3)), not left as torch.empty
    gives them (zeros, garbage or NaN)."""
    bound = 1.0 / math.sqrt(layer.in_features)
    weight = layer.weight.detach()
    if not torch.isfinite(weight).all() or weight.abs().max() > bound:
        return False
    return abs(float(weight.std()) - bound / math.sqrt(3.0)) < 0.15 * bound


def test_concurrent_loads_leave_other_threads_and_torch_init_alone(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("tiny").eval()
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, source, arch="tiny")
    expected = source.state_dict()
    initialisers = {name: getattr(nn.init, name) for name in dir(nn.init) if not name.startswith("__")}
    bad_layers, bad_loads, errors = [], [], []
    loading = threading.Event()

    def build_layers() -> None:
        loading.wait(5)
        for index in range(LAYERS):
            layer = nn.Linear(256, 64)
            if not _initialised_like_torch(layer):
                bad_layers.append(index)

    def load(count: int) -> None:
        try:
            for _ in range(count):
                loading.set()
                loaded = load_backbone(path).state_dict()
                if any(not torch.equal(loaded[key], value) for key, value in expected.items()):
                    bad_loads.append(1)
        except Exception as err:  # reported below: a thread's exception would otherwise vanish
            errors.append(repr(err))

    threads = [threading.Thread(target=build_layers)]
    threads += [threading.Thread(target=load, args=(LOADS // LOADERS,)) for _ in range(LOADERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert bad_loads == []
    assert bad_layers == [], f"{len(bad_layers)} of {LAYERS} layers built during loads were not initialised"
    assert {name: getattr(nn.init, name) for name in initialisers} == initialisers
    assert _initialised_like_torch(nn.Linear(256, 64))


def test_loading_on_the_meta_device_still_gives_every_tensor(tmp_path):
    """The skipped initialisers must not leave a meta tensor behind in the loaded model."""
    torch.manual_seed(1)
    source = build_backbone("tiny").eval()
    save_checkpoint(tmp_path / "m.pt", source, arch="tiny")
    loaded = load_backbone(tmp_path / "m.pt")
    assert not any(tensor.is_meta for tensor in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        faces = torch.rand(2, 3, 112, 112) * 2 - 1
        torch.testing.assert_close(loaded(faces), source(faces))

import pytest
import torch
from torch import nn

from memdetect.core.capture import LayerSpec, Trace, pool, probe_layers
from memdetect.errors import LayerError


class Toy(nn.Module):
    """act is called three times per forward, like diffusers' ResnetBlock2D.nonlinearity."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.SiLU()
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)
        self.after = 0

    def forward(self, x):
        x = self.act(self.a(x))
        x = self.act(self.b(x)) * 2
        x = self.c(self.act(x))
        self.after += 1
        return x


@pytest.mark.parametrize("text,spec", [
    ("a.b", LayerSpec("a.b")),
    ("a.b@2", LayerSpec("a.b", 2)),
    ("a.conv2:in", LayerSpec("a.conv2", 0, "in")),
    ("a.conv2:in@1", LayerSpec("a.conv2", 1, "in")),
])
def test_layer_spec_roundtrip(text, spec):
    assert LayerSpec.parse(text) == spec
    assert LayerSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["", "a b", "a@x", "a:foo", "a@1@2"])
def test_bad_layer_spec(bad):
    with pytest.raises(LayerError, match="bad layer spec"):
        LayerSpec.parse(bad)


def test_call_index_selects_the_call_and_early_exit_matches_full():
    m = Toy()
    x = torch.randn(3, 4)
    with Trace(m, ["act@0", "act@1", "act@2", "c:in"], stop=False) as full:
        m(x)
    assert m.after == 1
    assert torch.equal(full["act@2"], full["c:in"])  # the third SiLU call feeds c
    assert not torch.equal(full["act@0"], full["act@1"])
    for spec in ["act@0", "act@1", "act@2", "c:in"]:
        with Trace(m, [spec]) as tr:
            m(x)
        assert tr.stopped_early
        assert torch.equal(tr[spec], full[spec])
    assert m.after == 1  # every early-exit forward stopped before the end


def test_hooks_are_removed_after_exit_and_on_error():
    m = Toy()
    with Trace(m, ["act@1"]):
        m(torch.randn(1, 4))
    assert not m.act._forward_hooks and not m.act._forward_pre_hooks
    with pytest.raises(RuntimeError):
        with Trace(m, ["c:in"], stop=False):
            m(torch.randn(1, 5))  # shape error inside the forward
    assert not m.c._forward_pre_hooks


def test_missing_call_and_unknown_layer():
    m = Toy()
    with pytest.raises(LayerError, match="fired 3 time"):
        with Trace(m, ["act@5"]):
            m(torch.randn(1, 4))
    with pytest.raises(LayerError, match="not a module"):
        Trace(m, ["nope.layer"])


def test_shared_module_is_refused():
    m = Toy()
    m.other = m.act  # one object under two paths, as diffusers 0.22-0.32 did with SiLU
    with pytest.raises(LayerError, match="shared"):
        Trace(m, ["act@2"])


def test_pool():
    x = torch.randn(2, 5, 3, 3)
    assert torch.equal(pool(x, "spatial-max"), x.amax(dim=(2, 3)))
    t = torch.randn(2, 7, 5)
    assert torch.equal(pool(t, "token-max"), t.amax(dim=1))
    v = torch.randn(2, 5)
    assert pool(v, "token-max") is v
    with pytest.raises(LayerError):
        pool(x, "mean")


def test_probe_layers_counts_calls():
    m = Toy()
    infos = {i.spec: i for i in probe_layers(m, lambda: m(torch.randn(2, 4)))}
    assert infos["act"].calls == 3 and "act@2" in infos
    assert infos["a"].shape == (2, 4)

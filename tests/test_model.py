"""The from-scratch MLP against nn.Sequential: same weights, same outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import model as mlp
from pipeline.errors import PipelineError


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "leaky_relu"])
@pytest.mark.parametrize("hidden", [(256,), (64, 32)])
def test_scratch_and_module_agree_on_outputs_and_gradients(activation, hidden):
    generator = torch.Generator().manual_seed(0)
    module = mlp.build("module", hidden, activation, 0.1, generator)
    scratch = mlp.build("scratch", hidden, activation, 1.0)
    mlp.copy_weights(module, scratch)
    x = torch.randn(32, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    module_loss, scratch_loss = F.cross_entropy(module(x), y), F.cross_entropy(scratch(x), y)
    torch.testing.assert_close(scratch(x), module(x), rtol=1e-5, atol=1e-6)
    module_loss.backward()
    scratch_loss.backward()
    for module_param, scratch_param in zip(module.parameters(), scratch.parameters()):
        expected = module_param.grad.T if module_param.dim() == 2 else module_param.grad
        torch.testing.assert_close(scratch_param.grad, expected, rtol=1e-5, atol=1e-6)


def test_scratch_names_its_parameters_as_d2l_does():
    names = [name for name, _ in mlp.build("scratch", (256,), "relu", 0.01).named_parameters()]
    assert names == ["W1", "b1", "W2", "b2"]


@pytest.mark.parametrize("impl", ["module", "scratch"])
def test_weights_are_normal_with_init_std_and_biases_zero(impl):
    net = mlp.build(impl, (256,), "relu", 0.01, torch.Generator().manual_seed(0))
    weights = [p for p in net.parameters() if p.dim() == 2]
    biases = [p for p in net.parameters() if p.dim() == 1]
    assert abs(weights[0].std().item() - 0.01) < 0.0005 and abs(weights[0].mean().item()) < 0.0005
    assert all(bool((bias == 0).all()) for bias in biases)


@pytest.mark.parametrize(
    "name, reference",
    [("relu", F.relu), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("leaky_relu", F.leaky_relu)],
)
def test_hand_written_activations_match_torch(name, reference):
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(mlp.SCRATCH_ACTIVATIONS[name](x), reference(x), rtol=1e-5, atol=1e-6)


def test_saved_model_loads_with_weights_only_and_predicts_the_same(tmp_path):
    net = mlp.build("scratch", (16,), "tanh", 0.1, torch.Generator().manual_seed(1))
    mlp.save(net, tmp_path / "model.pt", {"impl": "scratch", "hidden": [16], "activation": "tanh"})
    loaded = mlp.load(tmp_path / "model.pt")
    x = torch.randn(4, 784)
    torch.testing.assert_close(loaded(x), net(x))
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == {"W1", "b1", "W2", "b2"}


class WritesMarker:
    """A pickle whose loading would run code: it would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"W1": WritesMarker(marker)}, tmp_path / "model.pt")
    (tmp_path / "model.json").write_text('{"impl": "scratch", "hidden": [16], "activation": "relu"}')
    with pytest.raises(PipelineError, match="refusing to load"):
        mlp.load(tmp_path / "model.pt")
    assert not marker.exists()


def test_diverged_model_is_never_loaded(tmp_path):
    (tmp_path / "model.json").write_text('{"impl": "module", "hidden": [16], "activation": "relu", "diverged": true}')
    with pytest.raises(PipelineError, match="diverged"):
        mlp.load(tmp_path / "model.pt")

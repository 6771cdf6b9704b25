"""oneDNN-prepacked linear layers (engines.onednn): the same model, dense weights back bit for bit."""

import json

import pytest
import torch
from torch import nn

from engines import onednn, small_linear
from engines.base import SamplingParams
from engines.hf import HFEngine
from engines.onednn import available, is_packed, pack_linears, unpack_linears
from envs import make_family
from envs.base import Message
from learners.fold import FoldConfig, FoldItem, fold
from tests.tiny import build_model

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch build has no oneDNN packed linears")


def lora_model(tokenizer, seed: int | None = None):
    """The tiny Llama under a LoRA adapter on every linear layer; with a seed, its B matrices drawn
    (std 0.5) so that the adapter does something."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if seed is not None:
        torch.manual_seed(seed)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(parameter, std=0.5)
    return model


class Net(nn.Module):
    """Two frozen layers, one trained, and an output head tied to an embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 24)
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)
        self.trained = nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.embed.weight
        for module in (self.embed, self.up, self.down):
            module.requires_grad_(False)
        self.embed.weight.requires_grad_(False)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return self.head(h + self.trained(h))


def test_pack_unpack_round_trip_and_outputs():
    net = Net()
    dense = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    x = torch.randn(5, 24)
    expected = net(x).detach()
    assert pack_linears(net) == 3  # up, down and the tied head; the trained layer is left alone
    assert pack_linears(net) == 0  # idempotent
    assert is_packed(net)
    assert net.up.weight.numel() == 0  # the dense copy is gone
    assert net.head.weight.data_ptr() == net.embed.weight.data_ptr()  # a tied weight is kept
    assert torch.allclose(net(x), expected, atol=1e-5, rtol=1e-5)
    assert unpack_linears(net) == 3
    assert not is_packed(net)
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, dense[name]), name
    assert "forward" not in net.up.__dict__


def test_input_gradient_and_trained_layer_match_dense():
    net = Net()
    x = torch.randn(7, 24, requires_grad=True)
    net(x).square().sum().backward()
    dense_x, dense_w = x.grad.clone(), net.trained.weight.grad.clone()
    x.grad = None
    net.trained.weight.grad = None
    pack_linears(net)
    net(x).square().sum().backward()
    assert torch.allclose(x.grad, dense_x, atol=1e-4, rtol=1e-4)
    assert torch.allclose(net.trained.weight.grad, dense_w, atol=1e-4, rtol=1e-4)
    assert net.up.weight.grad is None


def test_merging_into_a_packed_weight_fails_and_a_swapped_weight_is_used():
    net = Net()
    pack_linears(net)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            net.up.weight += torch.ones(40, 24)  # what merging an adapter would do
    x = torch.randn(3, 24)
    other = torch.randn(40, 24)
    saved = net.up.weight.data
    net.up.weight.data = other  # a teacher scope swapping weights in
    assert torch.allclose(net.up(x), x @ other.T + net.up.bias, atol=1e-6)
    net.up.weight.data = saved
    unpack_linears(net)
    assert torch.allclose(net.up(x), x @ Net().up.weight.T + net.up.bias, atol=1e-6)


def test_engine_generation_is_the_same_packed_or_not(tiny_tokenizer):
    prompts = [[{"role": "user", "content": f"count to {n}"}] for n in range(6)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    plain = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, packed_weights=False)
    packed = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer)
    expected = plain.generate(prompts, params)
    outputs = packed.generate(prompts, params)
    assert not is_packed(plain.model) and is_packed(packed.model)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    for got, want in zip(outputs, expected, strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    packed.unpack_weights()
    assert all(torch.equal(a, b) for a, b in zip(packed.model.state_dict().values(),
                                                 plain.model.state_dict().values(), strict=True))


def test_fold_is_the_same_packed_or_not(tiny_tokenizer, tmp_path):
    context = [Message(role="user", content="Say the word: apple"), Message(role="assistant", content="apple")]
    family = make_family("toy")
    items = [FoldItem(family=family.name, index=i, context=context) for i in range(8)]
    config = FoldConfig(steps=2, batch_size=4, learning_rate=5e-3, lora_rank=4, lora_alpha=8,
                        sampling={"temperature": 1.0, "max_new_tokens": 8})
    losses = {}
    for packed in (False, True):
        engine = HFEngine(build_model(tiny_tokenizer), tiny_tokenizer, model_name="tiny", batch_size=8,
                          packed_weights=packed)
        seen: list[bool] = []
        fold(engine, {family.name: family}, items, config, tmp_path / f"run-{packed}",
             on_step=lambda record, engine=engine, seen=seen: seen.append(is_packed(engine.model)))
        assert seen == [packed, packed]  # the fold ran on packed base layers, LoRA beside them
        assert not is_packed(engine.model)  # and gave dense weights back to merge the adapter
        losses[packed] = [json.loads(line)["loss"] for line in (tmp_path / f"run-{packed}" / "metrics.jsonl").open()]
        engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=2))  # serves the adapter
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)


def test_lora_beside_packed_layers_matches_peft(tiny_tokenizer):
    def student():
        return lora_model(tiny_tokenizer, seed=1).train()

    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    results = []
    for pack in (False, True):
        model = student()
        if pack:
            assert pack_linears(model) > 0
            lean = [m for m in model.modules() if isinstance(onednn._forward_owner(m), onednn._LeanLora)]
            assert len(lean) == 14  # 7 linear layers in each of the 2 blocks
        logits = model(ids).logits
        logits.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            served = model(ids).logits
            with model.disable_adapter():
                base = model(ids).logits
        results.append((logits.detach(), grads, served, base))
    (logits, grads, served, base), (packed_logits, packed_grads, packed_served, packed_base) = results
    assert torch.allclose(packed_logits, logits, atol=1e-5)
    assert torch.allclose(packed_served, served, atol=1e-5)
    assert torch.allclose(packed_base, base, atol=1e-5)
    assert not torch.allclose(base, served, atol=1e-3)  # the adapter does something
    assert grads.keys() == packed_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_project_uses_the_heads_packed_copy_and_matches():
    net = Net()
    hidden = torch.randn(6, 24, requires_grad=True)
    expected = hidden @ net.embed.weight.T
    (grad,) = torch.autograd.grad(expected.square().sum(), hidden)
    pack_linears(net)
    assert net.embed.weight.data_ptr() in onednn._KEPT
    got = onednn.project(hidden, net.embed.weight)
    assert torch.allclose(got, expected, atol=1e-5)
    (packed_grad,) = torch.autograd.grad(got.square().sum(), hidden)
    assert torch.allclose(packed_grad, grad, atol=1e-4)
    unpack_linears(net)
    assert net.embed.weight.data_ptr() not in onednn._KEPT
    assert torch.allclose(onednn.project(hidden, net.embed.weight), expected, atol=1e-6)


def test_without_copies_a_kept_weight_stays_plain():
    net = Net()
    assert pack_linears(net, copies=False) == 2  # up and down; the tied head is not copied
    assert "forward" not in net.head.__dict__ and net.embed.weight.data_ptr() not in onednn._KEPT
    assert pack_linears(net) == 1  # asked again with copies: the head now
    unpack_linears(net)


@pytest.fixture(params=["kernel", "packed"])
def decoding_kind(request, monkeypatch):
    """merged_decoding both ways: merged in place into plain weights that the small-batch kernel
    reads (where it runs), and packed with the adapter merged in (where it does not)."""
    if request.param == "packed":
        monkeypatch.setattr(small_linear, "ENABLED", False)
    elif not small_linear.available():
        pytest.skip("no small-batch linear kernel on this machine")
    return request.param


def test_merged_decoding_serves_the_adapter_merged_and_leaves_the_base_weights_plain(tiny_tokenizer, decoding_kind):
    model = lora_model(tiny_tokenizer, seed=1)
    base = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("base_layer.weight")}
    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    pack_linears(model)
    model.eval()
    with torch.no_grad():
        beside = model(ids).logits  # LoRA pairs beside the packed base layers
    calls = []
    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.lora_A["default"].register_forward_hook(lambda *_: calls.append(1))
    scope = onednn.merged_decoding(model)
    assert len(scope.layers) == 14
    with torch.no_grad():
        with scope:
            assert all(module.merged for module, _, _ in scope.layers)
            if decoding_kind == "kernel":  # W + s·BA made in the plain weight, nothing packed
                assert all(layer.plain is not None and layer.packed is None for _, layer, _ in scope.layers)
            else:
                assert all(layer.packed is not None and layer.plain is None for _, layer, _ in scope.layers)
            inside = model(ids).logits
        assert not calls  # one packed matmul a layer, no LoRA pair beside it
        assert not any(module.merged for module, _, _ in scope.layers)
    assert torch.allclose(inside, beside, atol=1e-5)
    assert all(layer.plain is not None and layer.packed is None for _, layer, _ in scope.layers)

    model.train()  # between rollouts: the passes with grad multiply by the plain weights
    logits = model(ids).logits
    logits.square().mean().backward()
    assert torch.allclose(logits.detach(), beside, atol=1e-5)
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
    model.zero_grad()
    with torch.no_grad(), onednn.merged_decoding(model):  # the next rollout packs them again
        assert torch.allclose(model.eval()(ids).logits, beside, atol=1e-5)
    unpack_linears(model)
    for name, parameter in model.named_parameters():
        if name in base:  # W + s·BA - s·BA: W up to float rounding, as peft's merge and unmerge
            assert torch.allclose(parameter, base[name], atol=1e-6), name


@pytest.mark.parametrize("where", ["delta", "pack"])
def test_merged_decoding_that_fails_on_entering_leaves_no_layer_merged(tiny_tokenizer, monkeypatch, where):
    if where == "pack":  # only the packed kind packs
        monkeypatch.setattr(small_linear, "ENABLED", False)
    model = lora_model(tiny_tokenizer, seed=0)
    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    pack_linears(model)
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    with onednn.merged_decoding(model):  # the layers plain between two scopes, as in a fold
        pass
    scope = onednn.merged_decoding(model)
    broken = scope.layers[5][0]
    real = getattr(onednn, "_add_delta" if where == "delta" else "_pack")

    def failing(weight, *rest):
        if where == "pack" and weight.data_ptr() == broken_plain.data_ptr() or (
                where == "delta" and rest[0] is broken and rest[2] > 0):
            raise MemoryError("no room for the merged weight")
        return real(weight, *rest)

    broken_plain = onednn._packed_layer(broken.base_layer).plain
    monkeypatch.setattr(onednn, "_add_delta" if where == "delta" else "_pack", failing)
    with pytest.raises(MemoryError), scope:
        pass
    monkeypatch.undo()
    assert not any(module.merged for module, _, _ in scope.layers)
    assert all(layer.plain is not None and layer.packed is None for _, layer, _ in scope.layers)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)  # the same model, some layers plain now
    unpack_linears(model)


def test_lora_mlp_runs_as_one_node_that_saves_less_with_the_same_gradients(tiny_tokenizer):
    model = lora_model(tiny_tokenizer, seed=2)
    model.train()
    pack_linears(model)
    mlps = [m for m in model.modules() if isinstance(onednn._forward_owner(m), onednn._LeanMLP)]
    assert len(mlps) == 2
    ids = torch.tensor([[3, 7, 11, 5, 9, 2, 4, 8]])

    def run():
        saved: dict[int, int] = {}

        def keep(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            logits = model(ids).logits
        nodes, stack, seen = set(), [logits.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nodes.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
        logits.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, sum(saved.values()), nodes

    fused_logits, fused_grads, fused_bytes, fused_nodes = run()
    for mlp in mlps:
        del mlp.forward  # the module's own forward: three LoRA nodes, silu and the product
    logits, grads, plain_bytes, plain_nodes = run()
    assert "_SwiGLULoraBackward" in fused_nodes and "_SwiGLULoraBackward" not in plain_nodes
    assert "SiluBackward0" in plain_nodes and "SiluBackward0" not in fused_nodes
    assert torch.allclose(fused_logits, logits, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-6, rtol=1e-5), name
    assert plain_bytes - fused_bytes >= 2 * 2 * 8 * 64 * 4  # g and u kept; silu(g) and h (8 x 64) not, in 2 layers
    unpack_linears(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_lora_mlp_without_grad_or_with_adapters_off_runs_the_modules_own_forward(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    pack_linears(model)
    mlp = next(m for m in model.modules() if isinstance(onednn._forward_owner(m), onednn._LeanMLP))
    lean = onednn._forward_owner(mlp)
    x = torch.randn(3, mlp.gate_proj.in_features, requires_grad=True)
    assert lean._fused(x) is not None
    with torch.no_grad():
        assert lean._fused(x) is None
    with model.disable_adapter():
        assert lean._fused(x) is None
    with onednn.merged_decoding(model):
        assert lean._fused(x) is None
    assert lean._fused(x) is not None  # plain base weights after the scope: still one node
    unpack_linears(model)

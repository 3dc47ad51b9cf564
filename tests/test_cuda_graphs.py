"""The ops and the model captured in a CUDA graph (what torch.compile's mode="reduce-overhead" and hand-made graphs
do): after a warm-up on a side stream (kernels compiled and tuned, index checks done), the capture makes no host sync
and no allocation outside the graph's pool, and a replay on new input values gives what an eager call on those
values gives. GPU only."""

import pytest
import torch

import vlmo_fast as vf

from test_ops_dtypes import B, D, N, OPS, op_on

pytestmark = pytest.mark.gpu  # (skipped without CUDA: conftest)


def capture(fn, *static_inputs):
    """fn(*static_inputs) warmed up on a side stream, then captured: (graph, its static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fn(*static_inputs)
    return graph, out


def assert_same(got, want, name, tol):
    """got (the replay's) equals want (the eager call's) up to ``tol`` (the kernels are the same; a GEMM's algorithm
    may differ inside a graph): a stale replay, of the captured values, would be far off."""
    if isinstance(want, dict):
        assert set(got) == set(want), name
        for key in want:
            assert_same(got[key], want[key], f"{name}.{key}", tol)
    elif isinstance(want, torch.Tensor) and want.is_floating_point():
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_each_op_replays_in_a_cuda_graph(name, dtype):
    fn = op_on(name, "cuda", dtype)  # parameters in x's dtype (outside autocast the ops need it)
    static_x = torch.randn(B, N, D, device="cuda").to(dtype)
    graph, out = capture(fn, static_x)
    for _ in range(2):  # new values in the static input, twice
        fresh = torch.randn(B, N, D, device="cuda").to(dtype)
        static_x.copy_(fresh)
        graph.replay()
        with torch.no_grad():
            want = fn(fresh)
        torch.cuda.synchronize()
        assert_same(out, want, name, 1e-5 if dtype == torch.float32 else 1.6e-2)


def test_model_forward_replays_in_a_cuda_graph_under_autocast():
    cfg = vf.preset("vlmo_tiny_patch16")
    model = vf.VLMo(cfg).cuda().eval()
    lt, size = cfg.max_text_len, cfg.image_size

    def batch(lengths):
        ids = torch.randint(1000, 30000, (len(lengths), lt), device="cuda")
        masks = torch.ones(len(lengths), lt, dtype=torch.long, device="cuda")
        for row, n in enumerate(lengths):
            masks[row, n:] = 0
        image = torch.randn(len(lengths), 3, size, size, device="cuda")
        return {"text_ids": ids, "text_masks": masks, "image": [image]}

    def forward(static):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # (as CUDA graphs with AMP need)
            out = model.infer(static)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    static = batch([lt, 5, 2])
    graph, out = capture(forward, static)
    fresh = batch([3, lt, 7])  # other padding: the mask's derived values are recomputed on every replay
    for key in ("text_ids", "text_masks"):
        static[key].copy_(fresh[key])
    static["image"][0].copy_(fresh["image"][0])
    graph.replay()
    with torch.no_grad():
        want = forward(fresh)
    torch.cuda.synchronize()
    assert_same(out, want, "infer", 2e-2)


def test_an_index_no_warm_up_used_is_a_clear_error_inside_a_capture():
    """Checking and copying an index reads the host, which a capture may not: an index first met inside the capture
    is a clear error (before any illegal call, so the capture ends cleanly), not a CUDA error."""
    q = torch.randn(B, 1, N, D, device="cuda")
    table, index = torch.randn(5, 1, device="cuda"), torch.randint(0, 5, (N, N), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="outside the capture"):
        with torch.no_grad(), torch.cuda.graph(graph):
            vf.ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, backend="triton")
    torch.cuda.synchronize()  # the device is still usable
    out = vf.ops.rel_pos_attention(q, q, q, bias_table=table, bias_index=index, backend="triton")
    assert torch.isfinite(out).all()

"""The shared visual memory: brute-force distances, references, state and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_faprompt.components import VisualMemory


def brute_force(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """min over every reference patch of (1 - cosine) / 2, one patch at a time, in float64."""
    layers, batch, patches, _ = queries.shape
    out = np.empty((layers, batch, patches))
    for layer in range(layers):
        bank = references[layer].reshape(-1, references.shape[-1]).astype(np.float64)
        for image in range(batch):
            for patch in range(patches):
                query = queries[layer, image, patch].astype(np.float64)
                cosines = [query @ entry / np.linalg.norm(query) / np.linalg.norm(entry) for entry in bank]
                out[layer, image, patch] = min((1 - cosine) / 2 for cosine in cosines)
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 8192])
def test_distances_equal_brute_force(chunk_size):
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(2, 3, 16, 8, generator=generator)
    queries = torch.randn(2, 2, 16, 8, generator=generator)
    memory = VisualMemory(chunk_size=chunk_size)
    memory.add(references[:, :2])
    memory.add(references[:, 2:])  # added in two steps: the same memory
    expected = brute_force(queries.numpy(), references.numpy())
    np.testing.assert_allclose(memory(queries).numpy(), expected, atol=1e-6)


def test_an_image_identical_to_a_reference_has_zero_distance_where_it_matches():
    generator = torch.Generator().manual_seed(1)
    references = torch.randn(1, 2, 25, 12, generator=generator)
    query = references[:, 1:2].clone()
    query[:, :, 3] = torch.randn(12, generator=generator)  # one patch altered
    distances = memory_of(references)(query)[0, 0]
    assert torch.count_nonzero(distances[torch.arange(25) != 3].abs() > 1e-6) == 0
    assert distances[3] > 1e-3


def memory_of(references: torch.Tensor) -> VisualMemory:
    memory = VisualMemory()
    memory.add(references)
    return memory


def test_state_dict_round_trip_restores_the_memory_of_any_size():
    memory = memory_of(torch.randn(2, 4, 9, 6))
    restored = VisualMemory()
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.bank, memory.bank)
    queries = torch.randn(2, 1, 9, 6)
    assert torch.equal(restored(queries), memory(queries))


def test_memory_grows_linearly_with_the_references():
    sizes = [memory_of(torch.randn(3, k, 49, 32)).nbytes for k in (1, 2, 4)]
    assert sizes == [3 * 49 * 32 * 4 * k for k in (1, 2, 4)]


def test_refusals_name_the_problem():
    with pytest.raises(RuntimeError, match=r"no references.*k_shot"):
        VisualMemory()(torch.randn(1, 1, 4, 4))
    memory = memory_of(torch.randn(2, 1, 4, 8))
    with pytest.raises(ValueError, match="1 layers × width 8 cannot join a memory of 2 layers × width 8"):
        memory.add(torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="not finite"):
        memory.add(torch.full((2, 1, 4, 8), float("nan")))
    with pytest.raises(ValueError, match="chunk_size"):
        VisualMemory(chunk_size=0)


def test_onnx_export_keeps_the_memory_as_a_constant(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    memory = memory_of(torch.randn(2, 3, 16, 8)).eval()
    memory.chunk_size = 20  # several chunks in the graph
    path = tmp_path / "memory.onnx"
    torch.onnx.export(
        memory,
        (torch.randn(2, 1, 16, 8),),
        str(path),
        input_names=["features"],
        dynamo=False,
        opset_version=18,
        dynamic_axes={"features": {1: "batch"}},
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [graph_input.name for graph_input in session.get_inputs()] == ["features"]
    queries = torch.randn(2, 3, 16, 8)
    (exported,) = session.run(None, {"features": queries.numpy()})
    np.testing.assert_allclose(exported, memory(queries).numpy(), atol=1e-4)

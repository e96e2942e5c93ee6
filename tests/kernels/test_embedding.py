"""The token embedding's CPU backward: ATen's kernel, the same gradient as nn.Embedding's, kept whole by
torch.compile."""

import torch
import torch.nn.functional as F

from scalelm.kernels.cpu.embedding import ATenBackwardEmbedding, embedding


def _grad(fn, ids, weight, grad):
    weight = weight.detach().clone().requires_grad_()
    fn(ids, weight).backward(grad)
    return weight.grad


def test_gradient_equals_f_embedding_with_repeated_ids():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (4, 50))  # every row of the table hit many times
    weight, grad = torch.randn(10, 16), torch.randn(4, 50, 16)
    torch.testing.assert_close(embedding(ids, weight), F.embedding(ids, weight), rtol=0, atol=0)
    torch.testing.assert_close(_grad(embedding, ids, weight, grad), _grad(F.embedding, ids, weight, grad),
                               rtol=1e-6, atol=1e-6)


def test_gradient_is_the_same_on_any_thread_count():
    torch.manual_seed(0)
    ids, weight, grad = torch.randint(0, 7, (8, 64)), torch.randn(7, 32), torch.randn(8, 64, 32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grad(embedding, ids, weight, grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_compiled_lookup_keeps_the_backward_whole_and_matches_eager():
    torch.manual_seed(0)
    table = ATenBackwardEmbedding(12, 8)
    ids = torch.randint(0, 12, (3, 20))
    explained = torch._dynamo.explain(table)(ids)
    assert explained.graph_break_count == 0
    compiled = torch.compile(table)
    compiled(ids).square().sum().backward()
    got = table.weight.grad.clone()
    table.weight.grad = None
    F.embedding(ids, table.weight).square().sum().backward()
    torch.testing.assert_close(got, table.weight.grad, rtol=1e-6, atol=1e-6)


def test_options_of_nn_embedding_keep_its_own_forward():
    table = ATenBackwardEmbedding(12, 8, padding_idx=0)
    ids = torch.tensor([[0, 3, 0, 5]])
    table(ids).sum().backward()
    assert torch.count_nonzero(table.weight.grad[0]) == 0  # padding row gets no gradient, as in nn.Embedding

"""A model forward replayed from a CUDA graph: the decoding option ``cuda_graph`` (``generation/sampler.py``).

At small batches a forward of a transformer is bound by launching its kernels, not by running them: each of its
few hundred operations costs Python and the CUDA driver tens of microseconds, while the GPU finishes it in a few.
A CUDA graph records the kernels of one forward once (``torch.cuda.graph``) and replays them with one launch;
the replay runs the same kernels on the same buffers, so it computes exactly what the recorded forward computed
for whatever those buffers hold at replay time.

So the recorded call must read its inputs from tensors that stay where they are between calls (the decoding
buffer, which the sampler writes in place) and must not synchronise with the CPU while recording (a model that
does, e.g. through ``.item()`` in remote modelling code, cannot be recorded: the error says so). Its output is
one tensor in the graph's memory, overwritten by every replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphedCall:
    """``call()`` replayed from a CUDA graph recorded at the first call.

    The first call runs ``call`` once eagerly on a side stream (lazy initialisation that must not happen while
    recording: cuBLAS workspaces, kernel selection), records it, and replays the recording; every later call
    only replays. Each call returns the same output tensor, holding this replay's result.
    """

    def __init__(self, call: Callable[[], torch.Tensor], what: str):
        self.call, self.what = call, what
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            self._record()
        self.graph.replay()
        return self.output

    def _record(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.output = self.call()
        except RuntimeError as error:
            raise RuntimeError(f"--cuda-graph: {self.what} cannot be recorded in a CUDA graph "
                               f"({str(error).strip().splitlines()[0]}); decode without --cuda-graph") from error
        self.graph = graph

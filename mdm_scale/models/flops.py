"""Model FLOPs per trained token, the convention of Megatron and PaLM that benchmarks and the trainer share.

    F = 6 N + 12 l d T

forward + backward: 6 N for the matrix products of N parameters (embedding and output layer included), and
12 l d T for the attention scores and values of l layers of width d over all T keys (bidirectional). A token
of MIRROR's second row counts like any other token.
"""

from __future__ import annotations


def flops_per_token(parameters: int, layers: int, width: int, seq_len: int) -> float:
    return 6.0 * parameters + 12.0 * layers * width * seq_len

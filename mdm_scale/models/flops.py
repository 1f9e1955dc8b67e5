"""Model FLOPs per trained token, the convention of Megatron and PaLM that benchmarks and the trainer share.

    F = 4 N + 2 T + 12 l d T_seq

forward 2 N and backward through the activations 2 N for the matrix products of N parameters (embedding and
output layer included), the weight gradients 2 T of the T trained ones (T = N: the usual 6 N; LoRA: only the
adapters, so about 4 N), and 12 l d T_seq for the attention scores and values of l layers of width d over all
T_seq keys (bidirectional), forward and backward. A token of MIRROR's second row counts like any other token.
"""

from __future__ import annotations


def flops_per_token(parameters: int, layers: int, width: int, seq_len: int, trained: int | None = None) -> float:
    """``trained`` parameters (default: all of them) get weight gradients."""
    trained = parameters if trained is None else trained
    return 4.0 * parameters + 2.0 * trained + 12.0 * layers * width * seq_len

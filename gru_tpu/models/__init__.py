"""Recurrent stacks on one interface: `y, h_n = model(x_BxTxI, seq_lengths, initial_carry)`."""

from gru_tpu.models.gru import GRU, compiler_options
from gru_tpu.models.lstm import LSTM
from gru_tpu.models.mingru import MinGRU
from gru_tpu.models.stack import RecurrentStack

__all__ = ["GRU", "LSTM", "MinGRU", "RecurrentStack", "compiler_options"]

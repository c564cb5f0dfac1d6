"""Analysis of the networks: FLOP counts, signal-propagation statistics, gamma estimation.

  flops.py               MACs and parameter counts from shapes (`jax.eval_shape`)
  signal_propagation.py  per-block statistics at initialisation and the NF predictions
  gamma.py               gamma = 1 / std(f(x)) for x ~ N(0, 1) (needs scipy)

These import the models, never the reverse.
"""

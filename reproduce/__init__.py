"""Small-scale reproductions of the NF-ResNet / NFNet papers' figures and tables.

One command per result, each writing into reproduce/results/ and reproduce/figures/:

  python -m reproduce.signal_propagation   # Signal Propagation Plots at initialisation
  python -m reproduce.agc_batch_size       # AGC vs batch size on MNIST-5k (--quick: smoke run)
  python -m reproduce.gamma_table          # activation gammas vs the official constants
"""

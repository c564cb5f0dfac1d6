"""Training: typed options, the train/eval steps, optimizer + AGC, the loop, checkpoints, reports.

  options.py      ExperimentOptions: the config read once into frozen dataclasses
  state.py        TrainState, init, replicate / shard / unreplicate, the applied-update count
  step.py         the pmapped train step (bf16, accumulation, SAM, EMA) and eval step
  optim.py agc.py the paper's optimizer chain, AGC as an optax transformation
  loop.py         run(): options -> data -> state -> steps -> evaluation -> checkpoints, reports
  evaluation.py   top-1/top-5/loss over an eval split
  checkpoints.py  orbax checkpoints with digests, resume, the model signature
  workdir.py      the workdir lock, config.json / dataset.json
  reporting.py    TensorBoard, metrics.jsonl, progress lines, MFU
  plan.py         --mode=plan: memory and throughput before a run
  signals.py      SIGTERM/SIGINT as a flag; distributed.py: multi-host start-up

Nothing is imported here, so `import nfnets.train.signals` stays free of JAX.
"""

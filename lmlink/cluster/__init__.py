"""Cluster mode: one model sharded over several Macs with mlx.distributed, served by rank 0.

- `spec`: the cluster file format (TOML) and its validation.
- `launch`: `lmlink cluster up` / `check`: builds the mpirun / mlx.launch command, runs every
  rank in one process group, tears the group down on failure or exit.
- `rank`: the program every rank runs (load the shard, run the lockstep engine; rank 0 serves).
- `control`: rank 0's side channel: heartbeats (failure detection), rank status, weight transfer.
"""

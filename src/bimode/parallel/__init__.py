"""Running curation and evaluation beyond one process: a Ray actor pool, or shards a scheduler starts apart.

Both commands cut their work into numbered batches (the resume unit) and run them the same way (`batch_run`:
resume checks, shard manifest, progress, the pool loop), handing each batch to a function that is the same in
every case (`bimode.curate.pipeline.curate_batch`, `bimode.eval.runner.eval_batch`): in this process (`LocalPool`),
on Ray actors that each hold one backend (`RayPool`; what a batch raises there is raised here as itself:
`failures`), or in one of K shard processes that each take the batches numbered i mod K (`Shard`), merged
afterwards (`bimode.parallel.shards.check_shards`). docs/cluster.md.
"""

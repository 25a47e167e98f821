"""Where the pipeline's train step runs: its own module, so that the pipeline (pipeline.training) and the
multi-node training job (pipeline.trainjob) both build on it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from cnnpipe.errors import CnnpipeError


@dataclass(frozen=True)
class Topology:
    """Where the train step runs: `nodes` pods (1: the pipeline's own train pod, as always; more: a Kubeflow
    training job, pipeline.trainjob) with `gpus_per_node` GPUs each. One GPU by default: what the single
    train pod has always asked for, so going to N nodes multiplies the same machine; 0 for CPU-only nodes.
    Set when compiling or submitting (`-p nodes=4`): the job's replica count and GPU limits are integers of
    its manifest, which a run's parameters cannot fill in."""

    nodes: int = 1
    gpus_per_node: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise CnnpipeError(f"-p nodes={self.nodes}: expected 1 or more")
        if self.gpus_per_node < 0:
            raise CnnpipeError(f"-p gpus_per_node={self.gpus_per_node}: expected 0 or more")

    @property
    def procs_per_node(self) -> int:
        """torchrun processes on each node: one per GPU, one on a CPU-only node."""
        return max(1, self.gpus_per_node)

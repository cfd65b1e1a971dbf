"""`stratified`: the mean loss on batches drawn uniformly over capability groups instead of by the
data's own mixture (group g drawn with probability 1/G, its tasks sharing it equally).

The baseline a reweighting method has to beat: Aioli (Chen et al. 2024, arXiv 2411.05735) finds that
no online or offline data-mixing method consistently outperforms stratified sampling. With a uniform
mixture and one group per task it is exactly `mean`.
"""
import torch

from capshape.objectives.mean import Mean
from capshape.objectives.base import OBJECTIVES


def per_task(group_probability: torch.Tensor, group_of_task: torch.Tensor) -> torch.Tensor:
    """Spread each group's probability evenly over its trained tasks: p_task = p_g / (tasks in g)."""
    tasks_in_group = torch.bincount(group_of_task, minlength=len(group_probability)).to(group_probability.dtype)
    probability = group_probability[group_of_task] / tasks_in_group[group_of_task]
    return (probability / probability.sum()).float()


@OBJECTIVES.register("stratified")
class Stratified(Mean):
    def mixture(self, data_mixture: torch.Tensor, group_of_task: torch.Tensor) -> torch.Tensor:
        return per_task(torch.ones(self.num_groups, dtype=torch.float64), group_of_task)

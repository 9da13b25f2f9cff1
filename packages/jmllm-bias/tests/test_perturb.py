import pytest
import torch

from jmllm.align.testing import generated_images
from jmllm.bias.errors import BiasInputError
from jmllm.bias.perturb import PerturbationConfig, objective, owl_scores, perturb
from jmllm.bias.scores import QUERY_TEMPLATE


@pytest.fixture(scope="module")
def embedded(tiny_joint):
    emb = tiny_joint.embed(generated_images(4, size=64, seed=3))
    queries = tiny_joint.encode_queries(["man", "woman"], template=QUERY_TEMPLATE)
    return emb, queries


def _margin(model, t, q, reduce):
    logits, _ = model.detection_heads(t, q)  # (B, N, 2)
    logits = logits.mean(dim=1) if reduce == "mean" else logits.amax(dim=1)
    return logits[:, 1] - logits[:, 0]  # adversarial minus original, per image


def test_eps_zero_leaves_t_unchanged(tiny_joint, embedded) -> None:
    emb, q = embedded
    for steps in (1, 5):
        res = perturb(tiny_joint, emb.t, q, PerturbationConfig(eps=0.0, steps=steps))
        assert torch.equal(res.t, emb.t)
        assert torch.equal(res.scores_after, res.scores_before)
        assert res.linf.tolist() == [0.0] * 4


@pytest.mark.parametrize("eps", [0.01, 0.1, 1.0])
def test_fgsm_pushes_towards_the_adversarial_query(tiny_joint, embedded, eps) -> None:
    emb, q = embedded
    res = perturb(tiny_joint, emb.t, q, PerturbationConfig(eps=eps))
    # every coordinate moved by exactly eps (sign step), nothing else touched
    assert torch.allclose((res.t - emb.t).abs(), torch.full_like(emb.t, eps), atol=1e-6)
    before = _margin(tiny_joint, emb.t, q, "mean")
    after = _margin(tiny_joint, res.t, q, "mean")
    assert torch.all(after > before), (before, after)
    assert torch.all(res.objective_after < res.objective_before)
    # the recorded max logits are the detector's, before and after
    assert torch.allclose(res.logits_before, tiny_joint.detection_heads(emb.t, q)[0].amax(1))
    # swapping the roles of the queries moves t the other way
    swapped = perturb(tiny_joint, emb.t, q.flip(0), PerturbationConfig(eps=eps))
    assert torch.allclose(swapped.t - emb.t, -(res.t - emb.t), atol=1e-6)


def test_pgd_stays_in_the_ball_and_goes_further(tiny_joint, embedded) -> None:
    emb, q = embedded
    eps = 0.05
    fgsm = perturb(tiny_joint, emb.t, q, PerturbationConfig(eps=eps))
    pgd = perturb(tiny_joint, emb.t, q, PerturbationConfig(eps=eps, steps=8))
    assert torch.all(pgd.linf <= eps + 1e-6)
    assert torch.all(pgd.objective_after < pgd.objective_before)
    assert pgd.objective_after.sum() < fgsm.objective_after.sum()
    one = perturb(tiny_joint, emb.t, q, PerturbationConfig(eps=eps, steps=1, step_size=eps))
    assert torch.equal(one.t, fgsm.t)


def test_max_reduction_raises_the_max_margin(tiny_joint, embedded) -> None:
    emb, q = embedded
    res = perturb(tiny_joint, emb.t, q, PerturbationConfig(eps=0.01, reduction="max"))
    assert torch.all(_margin(tiny_joint, res.t, q, "max") > _margin(tiny_joint, emb.t, q, "max"))


class LinearHead:
    """Detection head linear in t with the two queries on disjoint coordinates (no common mode)."""

    def detection_heads(self, t, q):
        return t[:, 1:] @ q.T, None


def test_each_logit_moves_its_own_way_without_common_mode() -> None:
    q = torch.zeros(2, 6)
    q[0, :3] = 1.0
    q[1, 3:] = 1.0
    t = torch.randn(2, 5, 6)
    res = perturb(LinearHead(), t, q, PerturbationConfig(eps=0.5))
    before, after = LinearHead().detection_heads(t, q)[0], LinearHead().detection_heads(res.t, q)[0]
    assert torch.allclose(after[..., 0] - before[..., 0], torch.full((2, 4), -1.5))  # original down
    assert torch.allclose(after[..., 1] - before[..., 1], torch.full((2, 4), 1.5))  # adversarial up
    assert torch.all(res.scores_after[:, 1] > res.scores_before[:, 1])
    assert torch.all(res.scores_after[:, 0] < res.scores_before[:, 0])


def test_objective_and_scores_by_hand() -> None:
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-1.0, 3.0]]])  # (1, 3, 2)
    assert objective(logits).tolist() == pytest.approx([(2 - 1 - 4) / 3])
    assert objective(logits, "max").tolist() == [2.0 - 3.0]
    assert owl_scores(logits)[0].tolist() == pytest.approx(
        [torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(3.0)).item()]
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"eps": -1.0}, {"eps": float("nan")}, {"steps": 0}, {"step_size": 0.0}, {"reduction": "sum"}],
)
def test_bad_settings(kwargs) -> None:
    with pytest.raises(BiasInputError):
        PerturbationConfig(**kwargs)


def test_default_step_sizes() -> None:
    assert PerturbationConfig(eps=1.0).alpha == 1.0
    assert PerturbationConfig(eps=1.0, steps=10).alpha == pytest.approx(0.25)
    assert PerturbationConfig(eps=1.0, steps=10, step_size=0.3).alpha == 0.3


def test_query_too_long_for_owl_is_a_clear_error(tiny_joint, portraits, tmp_path) -> None:
    from jmllm.bias.assess import AssessConfig, assess_cohort

    cfg = AssessConfig("nurse", original="man", adversarial=" ".join(["very"] * 12) + " tall woman")
    with pytest.raises(BiasInputError, match=r"original/adversarial query: .*16"):
        assess_cohort(tiny_joint, portraits, tmp_path / "out", cfg)

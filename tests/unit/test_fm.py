"""Plain flow matching against a hand-written reference (value and gradients)."""

import torch
from torch import nn

from _toy_models import ToyVelocityModel, make_batch
from megatron_apex.objectives.fm import fm_loss


def test_fm_value_and_grads_match_hand_reference():
    model = ToyVelocityModel().double()
    x0, z, t, c, m = make_batch()
    out = fm_loss(model, x0, z, t, c, m)
    assert set(out) == {"loss", "l_fm"}

    # reference: one sample at a time, squared error summed then divided by the element count
    total = 0
    for i in range(x0.shape[0]):
        x_t = t[i] * z[i] + (1 - t[i]) * x0[i]
        v = model(x_t[None], t[i:i + 1], c[i:i + 1], context_mask=m[i:i + 1])[0]
        total = total + ((v - (z[i] - x0[i])) ** 2).sum() / x0[i].numel()
    ref = total / x0.shape[0]
    torch.testing.assert_close(out["loss"], ref)
    torch.testing.assert_close(out["l_fm"], ref)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(out["loss"], params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b)


class ScaleModel(nn.Module):
    """F(x_t) = w * x_t: the FM gradient has a closed form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x_t, t, context, context_mask=None, fake_condition=False, t_target=None):
        return self.w * x_t


def test_fm_gradient_closed_form():
    model = ScaleModel()
    x0, z, t, c, m = make_batch(sample_shape=(3, 4))
    loss = fm_loss(model, x0, z, t, c, m)["loss"]
    (grad,) = torch.autograd.grad(loss, [model.w])
    tb = t[:, None, None]
    x_t = tb * z + (1 - tb) * x0
    # d/dw mean (w x_t - (z - x))^2 = mean 2 (w x_t - (z - x)) x_t
    want = (2 * (0.7 * x_t - (z - x0)) * x_t).mean()
    torch.testing.assert_close(grad, want)

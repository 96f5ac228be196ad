"""predict_proba: batched softmax in eval mode, mode restored, uint8 accepted."""

from __future__ import annotations

import torch
from torch import nn

from histoshield.evaluation.predict import predict_proba


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)
        self.drop = nn.Dropout(0.9)
        self.calls: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.training)
        return self.fc(self.drop(x.flatten(1)))


def test_predict_proba_batches_eval_mode_and_restores() -> None:
    torch.manual_seed(0)
    net = _Net().train()
    x = torch.rand(10, 3, 4, 4)
    p = predict_proba(net, x, batch_size=3)
    assert net.training and net.calls == [False] * 4
    assert p.shape == (10, 2)
    net.eval()
    torch.testing.assert_close(p, torch.softmax(net(x), 1))
    torch.testing.assert_close(p.sum(1), torch.ones(10))
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(predict_proba(net, u8), torch.softmax(net(u8.float() / 255), 1))
    assert predict_proba(net, x[:0]).shape == (0, 2)

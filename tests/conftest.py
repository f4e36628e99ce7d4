import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class LinearBinary(torch.nn.Module):
    """Two classes split by the hyperplane w.x + b = 0: logits (0, w.x + b).

    Under N(0, sigma^2 I) noise, P(class 1) = Phi((w.x + b) / (sigma ||w||)) and the
    smoothed classifier's exact certified radius is the distance |w.x + b| / ||w||.
    """

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w.flatten(), b

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self.w.double() + self.b

    def forward(self, x):
        score = x.flatten(1) @ self.w.to(x.dtype) + self.b
        return torch.stack([torch.zeros_like(score), score], dim=1)


@pytest.fixture
def linear_binary():
    g = torch.Generator().manual_seed(1)
    return LinearBinary(torch.randn(3, 4, 5, generator=g), 0.3)

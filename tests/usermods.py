"""Small user models and data factories shared by the tests: the module a user would write.

``tests/test_user_models.py`` imports the classes; ``tests/test_cli_user_models.py`` copies this
file into a scratch folder and names its factories on the command line (``usermods_cli:mobilenet``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def train(model, batches, loss_fn, steps=30, lr=0.02):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model, batches[i % len(batches)]).backward()
        opt.step()
    return model.eval()


class TinyMobileNet(nn.Module):
    """Stem conv + BN, depthwise 3x3, pointwise 1x1, GELU, global pooling, linear head."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.gelu(self.bn(self.stem(x)))
        x = F.gelu(self.pw(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def images_of(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[:, 0] += (y[:, None, None] - 1.5) * 0.8
    return x, y


def mobilenet():
    torch.manual_seed(0)
    x, y = images_of(128, 0)
    return train(TinyMobileNet(), [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)],
                  lambda m, b: F.cross_entropy(m(b[0]), b[1]))


def images():
    x, y = images_of(160, 1)
    return {"calib": (x[:64], y[:64]), "heldout": (x[64:96], y[64:96]),
            "test": torch.utils.data.TensorDataset(x[96:], y[96:])}


class TokenClassifier(nn.Module):
    def __init__(self, vocab=30, d=16, classes=3, layers=1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def _tokens(n, seed):
    ids = torch.randint(0, 30, (n, 8), generator=torch.Generator().manual_seed(seed))
    return ids, ids[:, 0] % 3


def token_classifier():
    torch.manual_seed(0)
    ids, y = _tokens(64, 2)
    return train(TokenClassifier(), [(ids[:32], y[:32]), (ids[32:], y[32:])],
                  lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=20)


def tokens():
    ids, y = _tokens(96, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[:48], y[:48]),
                                         batch_size=16)
    return {"calib": loader, "test": (ids[48:], y[48:])}


class TinyLM(nn.Module):
    def __init__(self, vocab=24, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        steps = torch.arange(1, h.shape[1] + 1)[:, None]
        return self.out(h + torch.tanh(self.mix(torch.cumsum(h, 1) / steps)))


def lm():
    torch.manual_seed(0)
    return TinyLM().eval()


def lm_data():
    ids = torch.randint(0, 24, (64, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0
    return {"calib": {"input_ids": ids[:32], "attention_mask": mask[:32]},
            "test": {"input_ids": ids[32:], "attention_mask": mask[32:]}}


class LossDictNet(nn.Module):
    """Detection-style: a dict of losses when called with (inputs, targets)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.cls = nn.Linear(16, 3)
        self.box = nn.Linear(16, 4)

    def forward(self, x, targets):
        h = torch.relu(self.body(x))
        return {"loss_cls": F.cross_entropy(self.cls(h), targets["labels"]),
                "loss_box": F.smooth_l1_loss(self.box(h), targets["boxes"])}


def detector():
    torch.manual_seed(0)
    return LossDictNet().eval()


def boxes():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 10, generator=g)
    t = {"labels": torch.randint(0, 3, (64,), generator=g),
         "boxes": torch.randn(64, 4, generator=g)}
    part = lambda a, b: (x[a:b], {k: v[a:b] for k, v in t.items()})
    return {"calib": part(0, 32), "test": part(32, 64)}


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def everything():
    """Model, task and data from one factory."""
    torch.manual_seed(0)
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(6))
    return {"model": Encoder().eval(), "task": "embedding",
            "data": {"calib": x[:48], "test": x[48:]}}

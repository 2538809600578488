"""The peer a user would otherwise pick: the seed model and recipe in PyTorch, on the same GPU.

    python benchmarks/torch_peer.py [--mode eager,compile] [--batch_size 32] [--steps 300]
                                    [--repeats 3] [--out FILE]

Not a dependency of resnet_jax (PyTorch is not installed with it): a benchmark script. The same
ResNet v1 (32 filters, blocks 3,3,2, conv biases, BatchNorm momentum 0.99 / eps 1e-3), the loss
with 1e-4 x sum of conv kernels squared, Keras-form Adam (torch's fused Adam with the time-varying
epsilon eps / sqrt(1 - b2**t) that makes it Keras's update, see resnet_jax/optim.py), and the
seed's augmentation (bilinear shift of up to 10 %, edge fill, flip) done on the GPU. Data lives on
the GPU as uint8, the model and inputs are channels_last, TF32 is allowed for convolutions and
matmuls (JAX's default precision on GPUs does the same). Batch metrics stay on the GPU (no sync
per step). Modes: eager; compile (torch.compile of the forward pass and loss, default mode);
compile_cudagraphs (mode="reduce-overhead"). Prints one JSON line per mode (what: torch_<mode>).
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import emit


def he_normal_(weight):
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978  # Keras's truncated-normal correction
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.proj = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu((self.proj(x) if self.proj is not None else x) + y)


class ResNet(nn.Module):
    def __init__(self, filters=32, stages=(3, 3, 2), classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, filters, 3, 1, 1)
        self.bn = nn.BatchNorm2d(filters, eps=1e-3, momentum=0.01)
        blocks, cin = [], filters
        for i, n in enumerate(stages):
            for j in range(n):
                blocks.append(Block(cin, filters * 2**i, 2 if i > 0 and j == 0 else 1))
                cin = filters * 2**i
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                he_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def augment(x, shift=0.1):
    """Bilinear shift by U(-0.1, 0.1) x size with edge fill, then a left-right flip (p 0.5)."""
    n, _, h, w = x.shape
    t = (torch.rand(n, 2, device=x.device) * 2 - 1) * shift
    flip = torch.rand(n, device=x.device) < 0.5
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0)
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = t[:, 0] * w * 2 / (w - 1)
    theta[:, 1, 2] = t[:, 1] * h * 2 / (h - 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def make_loss(model, mean, l2=1e-4):
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]

    def loss_fn(images_u8, labels):
        x = images_u8.permute(0, 3, 1, 2).float() / 255.0 - mean
        x = augment(x).contiguous(memory_format=torch.channels_last)
        logits = model(x)
        ce = F.cross_entropy(logits, labels)
        loss = ce + l2 * sum(w.square().sum() for w in convs)
        return loss, (logits.argmax(1) == labels).sum()

    return loss_fn


def run(mode, a, images, labels):
    torch.manual_seed(0)
    model = ResNet().to(a.device).to(memory_format=torch.channels_last)
    mean = images.float().mean(0).permute(2, 0, 1)[None] / 255.0
    loss_fn = make_loss(model, mean)
    if mode == "compile":
        loss_fn = torch.compile(loss_fn)
    elif mode == "compile_cudagraphs":
        loss_fn = torch.compile(loss_fn, mode="reduce-overhead")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), fused=True)
    b2, eps = 0.999, 1e-7
    n = len(images)
    state = {"t": 0, "perm": torch.randperm(n, device=a.device), "pos": 0}
    totals = torch.zeros(2, device=a.device)

    def step():
        if state["pos"] + a.batch_size > n:
            state["perm"], state["pos"] = torch.randperm(n, device=a.device), 0
        idx = state["perm"][state["pos"] : state["pos"] + a.batch_size]
        state["pos"] += a.batch_size
        state["t"] += 1
        opt.param_groups[0]["eps"] = eps / math.sqrt(1 - b2 ** state["t"])  # Keras's form
        loss, correct = loss_fn(images[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        totals[0] += loss.detach()
        totals[1] += correct

    start = time.perf_counter()
    for _ in range(a.warmup):
        step()
    sync(a.device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync(a.device)
        times.append(time.perf_counter() - start)
    best = min(times)
    ips = a.steps * a.batch_size / best
    return {
        "what": f"torch_{mode}",
        "device_kind": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "dtype": "float32",
        "batch_size": a.batch_size,
        "train_images_per_s": round(ips, 1),
        "ms_per_step": round(1e3 * best / a.steps, 4),
        "epoch_s": round(50_000 / ips, 2),
        "warmup_s": round(warmup_s, 2),
        "torch": torch.__version__,
        "loss_finite": bool(torch.isfinite(totals[0]).item()),
    }


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--mode", default="eager,compile,compile_cudagraphs")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n_train", type=int, default=50_000)
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch_peer.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True  # what a user tuning for speed sets
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    g = torch.Generator(device=a.device).manual_seed(0)
    images = torch.randint(0, 256, (a.n_train, 32, 32, 3), dtype=torch.uint8, device=a.device, generator=g)
    labels = torch.randint(0, 10, (a.n_train,), device=a.device, generator=g)
    for mode in a.mode.split(","):
        try:
            result = run(mode, a, images, labels)
        except Exception as e:  # noqa: BLE001 - report and go on with the next mode
            result = {"what": f"torch_{mode}", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        emit(result, a.out)


if __name__ == "__main__":
    main()

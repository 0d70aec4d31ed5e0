"""The built-in synthetic set: photo-like scenes with objects and their VMS maps, in VISCHEMA PLUS's format.

It stands in for the real data on a machine without it (every script says so on its first line), so that everything
runs and is tested anywhere: it is deterministic and learnable (a trained model beats every constant map on it), and
its numbers say nothing about the study. vischema.load_data is its only user.
"""
import torch
import torch.nn.functional as F

# Object classes: name, colour (RGB in [0, 1]), width and height factors, round or not, role. "memorable" objects get
# green VMS rectangles, "lure" objects red ones, "neutral" objects none. The class shows in colour and shape, the
# position is random (centre-biased, like photographs): a model can learn the maps, no constant map can match them.
SYNTH_CLASSES = [("face", (0.95, 0.75, 0.55), 1.0, 1.0, True, "memorable"),
                 ("sign", (1.00, 0.85, 0.10), 1.0, 1.0, False, "memorable"),
                 ("car", (0.15, 0.30, 0.90), 1.6, 0.7, False, "lure"),
                 ("tree", (0.15, 0.55, 0.20), 1.0, 1.0, True, "neutral"),
                 ("rock", (0.50, 0.48, 0.45), 1.6, 0.7, False, "neutral"),
                 ("door", (0.45, 0.25, 0.10), 0.6, 1.8, False, "neutral")]
SYNTH_SCENES = ["outdoor", "indoor"]


def scenes(size=64, n=1600, seed=0, max_objects=6):
    """n photos and their VMS maps, deterministic by seed: (photos, maps, scene names), the photos and maps as
    n x 3 x size x size uint8 tensors (as decoded JPEGs would be) and each scene "outdoor" or "indoor"."""
    g = torch.Generator().manual_seed(seed)
    k = max_objects
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    table = lambda i: torch.tensor([c[i] for c in SYNTH_CLASSES])  # noqa: E731
    yy = xx = (torch.arange(size) + 0.5) / size
    yy, xx = yy.view(1, 1, size, 1), xx.view(1, 1, 1, size)

    # Background: sky (or ceiling) over ground (or floor) at a random horizon, low-frequency texture.
    scene = (rand(n) < 0.5).long()  # 0 outdoor, 1 indoor
    top = torch.tensor([[0.55, 0.70, 0.90], [0.85, 0.82, 0.75]])[scene] + 0.1 * (rand(n, 3) - 0.5)
    bottom = torch.tensor([[0.45, 0.55, 0.30], [0.55, 0.45, 0.35]])[scene] + 0.1 * (rand(n, 3) - 0.5)
    ground = (yy > 0.35 + 0.3 * rand(n, 1, 1, 1)).float()
    img = top.view(n, 3, 1, 1) * (1 - ground) + bottom.view(n, 3, 1, 1) * ground
    img = img + 0.15 * F.interpolate(rand(n, 1, 8, 8) - 0.5, size=(size, size), mode="bicubic", align_corners=False)

    # Objects, painted back to front; k per image, some absent; then sensor noise.
    cls = torch.multinomial(torch.tensor([0.2, 0.2, 0.15, 0.15, 0.15, 0.15]), n * k, True, generator=g).view(n, k)
    present = (rand(n, k) < 0.7).view(n, k, 1, 1)
    cx = (0.5 + 0.25 * torch.randn(n, k, generator=g)).clamp(0.1, 0.9).view(n, k, 1, 1)
    cy = (0.55 + 0.2 * torch.randn(n, k, generator=g)).clamp(0.15, 0.9).view(n, k, 1, 1)
    half = (0.06 + 0.08 * rand(n, k)).view(n, k, 1, 1)
    dx, dy = (xx - cx) / (table(2)[cls].view(n, k, 1, 1) * half), (yy - cy) / (table(3)[cls].view(n, k, 1, 1) * half)
    round_ = table(4)[cls].view(n, k, 1, 1)
    inside = torch.where(round_, dx ** 2 + dy ** 2 < 1, (dx.abs() < 1) & (dy.abs() < 1)) & present
    colour = table(1)[cls] + 0.08 * (rand(n, k, 3) - 0.5)
    for j in range(k):
        img = torch.where(inside[:, j:j + 1], colour[:, j].view(n, 3, 1, 1), img)
    img = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)

    # Maps: each of three "observers" marks every memorable (green) or lure (red) object with a loose,
    # semi-transparent rectangle; the rectangles stack, as in the real maps.
    role = torch.tensor([["memorable", "lure", "neutral"].index(c[5]) for c in SYNTH_CLASSES])[cls]
    vms = torch.zeros(n, 3, size, size)
    for _ in range(3):
        jx, jy = 0.4 * (rand(n, k, 1, 1) - 0.5), 0.4 * (rand(n, k, 1, 1) - 0.5)
        grow = 1.2 + 0.6 * rand(n, k, 1, 1)
        box = ((dx - jx).abs() < grow) & ((dy - jy).abs() < grow) & present
        alpha = (0.25 + 0.2 * rand(n, k, 1, 1)) * box
        for channel, which in ((1, 0), (0, 1)):
            hit = (role == which).view(n, k, 1, 1)
            vms[:, channel] = 1 - (1 - vms[:, channel]) * torch.prod(1 - alpha * hit, dim=1)

    # The same uint8 round trip as decoded JPEGs, so both sources reach the models the same way.
    quantise = lambda t: (t * 255).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return quantise(img), quantise(vms), [SYNTH_SCENES[s] for s in scene.tolist()]

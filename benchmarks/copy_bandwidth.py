"""Device-to-device copy rate (bytes read + written per second), the floor's bandwidth input."""

import torch

n = 2 * 1024**3  # 2 GiB per buffer, far past L2
src = torch.randn(n // 4, device="cuda")
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
torch.cuda.synchronize()
times = []
for _ in range(20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    dst.copy_(src)
    b.record()
    b.synchronize()
    times.append(a.elapsed_time(b) / 1e3)
times.sort()
t = times[len(times) // 2]
print(f"{2 * n / t / 1e12:.3f}")

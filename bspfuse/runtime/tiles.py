"""The order in which a persistent program walks output tiles, shared by every generated GEMM kernel."""
import triton
import triton.language as tl


@triton.jit
def swizzle(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of tile `tile_id`: grouped, so GROUP_M row blocks share B tiles in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (tile_id // in_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % in_group) % group_size, (tile_id % in_group) // group_size

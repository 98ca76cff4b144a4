/* A fake CUDA driver library (libcuda.so.1) with the host<->device copy
 * entry points Tally probes, so real uprobes count real calls on machines
 * without a GPU. Each function only records that it ran; no memory is
 * touched through the (fake) device pointers.
 *
 * Built by the end-to-end tests (tests/e2e/src/probes_support.rs) with
 *   cc -shared -fPIC -O0 -fno-ipa-icf -Wl,-soname,libcuda.so.1 -o libcuda.so.1 libcuda.c
 * -O0 and distinct bodies keep every symbol at its own address: a uprobe is
 * placed on an address, and folded functions would fire each other's. */
#include <stddef.h>
#include <time.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef unsigned int CUdeviceptr_v1;
typedef void *CUstream;

typedef struct {
	size_t srcXInBytes, srcY;
	int srcMemoryType;
	const void *srcHost;
	CUdeviceptr srcDevice;
	void *srcArray;
	size_t srcPitch;
	size_t dstXInBytes, dstY;
	int dstMemoryType;
	void *dstHost;
	CUdeviceptr dstDevice;
	void *dstArray;
	size_t dstPitch;
	size_t WidthInBytes, Height;
} CUDA_MEMCPY2D;

_Static_assert(sizeof(CUDA_MEMCPY2D) == 128, "CUDA_MEMCPY2D is 128 bytes on x86_64");
_Static_assert(offsetof(CUDA_MEMCPY2D, dstMemoryType) == 72, "offset used by pcie.bpf.c");
_Static_assert(offsetof(CUDA_MEMCPY2D, WidthInBytes) == 112, "offset used by pcie.bpf.c");

/* One slot per entry point: distinct code per function. */
volatile size_t fake_cuda_bytes[32];

#define COPY(name, slot, ...) \
	CUresult name(__VA_ARGS__) { fake_cuda_bytes[slot] += n; return 0; }

COPY(cuMemcpyHtoD, 0, CUdeviceptr_v1 dst, const void *src, unsigned int n)
COPY(cuMemcpyHtoD_v2, 1, CUdeviceptr dst, const void *src, size_t n)
COPY(cuMemcpyHtoD_v2_ptds, 2, CUdeviceptr dst, const void *src, size_t n)
COPY(cuMemcpyHtoDAsync, 3, CUdeviceptr_v1 dst, const void *src, unsigned int n, CUstream s)
COPY(cuMemcpyHtoDAsync_v2, 4, CUdeviceptr dst, const void *src, size_t n, CUstream s)
COPY(cuMemcpyHtoDAsync_v2_ptsz, 5, CUdeviceptr dst, const void *src, size_t n, CUstream s)
COPY(cuMemcpyDtoH, 6, void *dst, CUdeviceptr_v1 src, unsigned int n)
COPY(cuMemcpyDtoH_v2, 7, void *dst, CUdeviceptr src, size_t n)
COPY(cuMemcpyDtoH_v2_ptds, 8, void *dst, CUdeviceptr src, size_t n)
COPY(cuMemcpyDtoHAsync, 9, void *dst, CUdeviceptr_v1 src, unsigned int n, CUstream s)
COPY(cuMemcpyDtoHAsync_v2, 10, void *dst, CUdeviceptr src, size_t n, CUstream s)
COPY(cuMemcpyDtoHAsync_v2_ptsz, 11, void *dst, CUdeviceptr src, size_t n, CUstream s)
COPY(cuMemcpy, 12, CUdeviceptr dst, CUdeviceptr src, size_t n)
COPY(cuMemcpy_ptds, 13, CUdeviceptr dst, CUdeviceptr src, size_t n)
COPY(cuMemcpyAsync, 14, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s)
COPY(cuMemcpyAsync_ptsz, 15, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s)

#define COPY2D(name, slot, ...) \
	CUresult name(__VA_ARGS__) { fake_cuda_bytes[slot] += p->WidthInBytes * p->Height; return 0; }

COPY2D(cuMemcpy2D_v2, 16, const CUDA_MEMCPY2D *p)
COPY2D(cuMemcpy2D_v2_ptds, 17, const CUDA_MEMCPY2D *p)
COPY2D(cuMemcpy2DUnaligned_v2, 18, const CUDA_MEMCPY2D *p)
COPY2D(cuMemcpy2DUnaligned_v2_ptds, 19, const CUDA_MEMCPY2D *p)
COPY2D(cuMemcpy2DAsync_v2, 20, const CUDA_MEMCPY2D *p, CUstream s)
COPY2D(cuMemcpy2DAsync_v2_ptsz, 21, const CUDA_MEMCPY2D *p, CUstream s)

/* Not a copy: present so a "driver" has more than the probed symbols. */
CUresult cuInit(unsigned int flags) { fake_cuda_bytes[31] = flags; return 0; }

/* What tests/gpu/gpu-hold.c needs around its copy: a device, a context and
 * an allocation that only exist as numbers. */
CUresult cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; fake_cuda_bytes[22]++; return 0; }
CUresult cuCtxCreate_v2(void **ctx, unsigned int flags, int dev)
{
	*ctx = (void *)&fake_cuda_bytes[23];
	fake_cuda_bytes[23] += flags + (size_t)dev;
	return 0;
}
CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t n) { *ptr = 0x1000; fake_cuda_bytes[24] += n; return 0; }
CUresult cuMemFree_v2(CUdeviceptr ptr) { fake_cuda_bytes[25] += ptr; return 0; }
CUresult cuCtxDestroy_v2(void *ctx) { fake_cuda_bytes[26] += ctx != NULL; return 0; }

/* What gpu-hold --busy needs: a module and kernel that only exist as
 * numbers, and a launch that "runs" for the kernel's one parameter (its
 * nanoseconds), so that synchronizing takes as long as on a GPU. */
static unsigned long long fake_kernel_ns;
CUresult cuDeviceGetAttribute(int *value, int attribute, int dev)
{
	*value = 2; /* multiprocessors, whatever was asked */
	fake_cuda_bytes[27] += (size_t)attribute + (size_t)dev;
	return 0;
}
CUresult cuModuleLoadData(void **module, const void *image)
{
	*module = (void *)&fake_cuda_bytes[28];
	fake_cuda_bytes[28] += image != NULL;
	return 0;
}
CUresult cuModuleGetFunction(void **function, void *module, const char *name)
{
	*function = (void *)&fake_cuda_bytes[29];
	fake_cuda_bytes[29] += module != NULL && name != NULL;
	return 0;
}
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
			unsigned bz, unsigned shared, void *stream, void **params, void **extra)
{
	fake_kernel_ns = *(unsigned long long *)params[0];
	fake_cuda_bytes[30] += (size_t)gx * gy * gz * bx * by * bz + shared + (f != NULL) +
			       (stream != NULL) + (extra != NULL);
	return 0;
}
CUresult cuCtxSynchronize(void)
{
	struct timespec t = { (time_t)(fake_kernel_ns / 1000000000ULL),
			      (long)(fake_kernel_ns % 1000000000ULL) };
	nanosleep(&t, NULL);
	fake_kernel_ns = 0;
	return 0;
}

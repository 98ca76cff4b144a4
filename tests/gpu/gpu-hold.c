/* Holds GPU memory for a while through the CUDA driver API only, so the
 * GPU check has a workload on a machine with nothing but the driver (no
 * CUDA toolkit, no Python):
 *
 *   gpu-hold [--lib LIBCUDA] [--device N] [--mib M] [--seconds S] [--busy]
 *
 * dlopens libcuda.so.1 (or LIBCUDA), creates a context on device N
 * (default 0), allocates M MiB (default 1024), copies them once host to
 * device with cuMemcpyHtoD_v2 (what the pcie uprobes count), prints one
 * line `gpu-hold: pid P holds M MiB on device N, copied B bytes`, sleeps S
 * seconds (default 20), frees and exits 0. Exits 1 naming the call that
 * failed. Changes no GPU setting.
 *
 * With --busy it keeps the GPU's SMs busy instead of sleeping: a kernel
 * that spins on the global timer, given as PTX (the driver compiles it; no
 * toolkit needed), launched one block per SM for 200 ms at a time until S
 * seconds have passed. It then prints `gpu-hold: busy B ms in K launches`.
 * Where the driver cannot load the kernel it says why and holds idle. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;
typedef void *CUmodule;
typedef void *CUfunction;

/* Spins until `ns` nanoseconds of the global timer have passed. PTX ISA
 * 7.0 for Turing and later, which every driver since CUDA 11 compiles. */
static const char SPIN_PTX[] = ".version 7.0\n"
			       ".target sm_75\n"
			       ".address_size 64\n"
			       ".visible .entry spin(.param .u64 ns)\n"
			       "{\n"
			       "	.reg .pred %p;\n"
			       "	.reg .b64 %rd<5>;\n"
			       "	ld.param.u64 %rd1, [ns];\n"
			       "	mov.u64 %rd2, %globaltimer;\n"
			       "$Lspin:\n"
			       "	mov.u64 %rd3, %globaltimer;\n"
			       "	sub.s64 %rd4, %rd3, %rd2;\n"
			       "	setp.lt.u64 %p, %rd4, %rd1;\n"
			       "	@%p bra $Lspin;\n"
			       "	ret;\n"
			       "}\n";
#define CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT 16

static void *lib;

static void *sym(const char *name)
{
	void *f = dlsym(lib, name);
	if (!f) {
		fprintf(stderr, "gpu-hold: %s not exported by the CUDA driver library\n", name);
		exit(1);
	}
	return f;
}

static void check(CUresult r, const char *call)
{
	if (r != 0) {
		fprintf(stderr, "gpu-hold: %s failed: CUresult %d\n", call, r);
		exit(1);
	}
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* Keeps every SM of `dev` busy for `seconds` (see the top); holds idle
 * when the kernel cannot be loaded. */
static void spin(CUdevice dev, unsigned long seconds)
{
	CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice) = sym("cuDeviceGetAttribute");
	CUresult (*cuModuleLoadData)(CUmodule *, const void *) = sym("cuModuleLoadData");
	CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *) =
		sym("cuModuleGetFunction");
	CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
				   unsigned, unsigned, void *, void **, void **) = sym("cuLaunchKernel");
	CUresult (*cuCtxSynchronize)(void) = sym("cuCtxSynchronize");
	CUmodule module;
	CUfunction kernel;
	CUresult r = cuModuleLoadData(&module, SPIN_PTX);
	if (r == 0)
		r = cuModuleGetFunction(&kernel, module, "spin");
	if (r != 0) {
		printf("gpu-hold: no kernel (cuModuleLoadData/cuModuleGetFunction: CUresult %d); "
		       "holding idle\n",
		       r);
		fflush(stdout);
		sleep(seconds);
		return;
	}
	int sms = 1;
	check(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
	      "cuDeviceGetAttribute");
	unsigned long long ns = 200000000ULL;
	void *params[] = { &ns };
	double start = now();
	unsigned long launches = 0;
	while (now() - start < seconds) {
		check(cuLaunchKernel(kernel, sms, 1, 1, 32, 1, 1, 0, NULL, params, NULL),
		      "cuLaunchKernel");
		check(cuCtxSynchronize(), "cuCtxSynchronize");
		launches++;
	}
	printf("gpu-hold: busy %.0f ms in %lu launches on %d SMs\n", (now() - start) * 1000,
	       launches, sms);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	const char *path = "libcuda.so.1";
	int device = 0;
	unsigned long mib = 1024, seconds = 20;
	int busy = 0;
	for (int i = 1; i < argc; i++) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(argv[i], "--busy")) {
			busy = 1;
			continue;
		}
		if (!strcmp(argv[i], "--lib") && v)
			path = v;
		else if (!strcmp(argv[i], "--device") && v)
			device = atoi(v);
		else if (!strcmp(argv[i], "--mib") && v)
			mib = strtoul(v, NULL, 10);
		else if (!strcmp(argv[i], "--seconds") && v)
			seconds = strtoul(v, NULL, 10);
		else {
			fprintf(stderr,
				"usage: %s [--lib LIBCUDA] [--device N] [--mib M] [--seconds S] [--busy]\n",
				argv[0]);
			return 2;
		}
		i++;
	}
	lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		fprintf(stderr, "gpu-hold: cannot open %s: %s\n", path, dlerror());
		return 1;
	}
	CUresult (*cuInit)(unsigned int) = sym("cuInit");
	CUresult (*cuDeviceGet)(CUdevice *, int) = sym("cuDeviceGet");
	CUresult (*cuCtxCreate)(CUcontext *, unsigned int, CUdevice) = sym("cuCtxCreate_v2");
	CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = sym("cuMemAlloc_v2");
	CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t) = sym("cuMemcpyHtoD_v2");
	CUresult (*cuMemFree)(CUdeviceptr) = sym("cuMemFree_v2");
	CUresult (*cuCtxDestroy)(CUcontext) = sym("cuCtxDestroy_v2");

	size_t bytes = (size_t)mib << 20;
	CUdevice dev;
	CUcontext ctx;
	CUdeviceptr ptr;
	check(cuInit(0), "cuInit");
	check(cuDeviceGet(&dev, device), "cuDeviceGet");
	check(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate_v2");
	check(cuMemAlloc(&ptr, bytes), "cuMemAlloc_v2");
	void *host = calloc(1, bytes);
	if (!host) {
		fprintf(stderr, "gpu-hold: cannot allocate %zu host bytes\n", bytes);
		return 1;
	}
	check(cuMemcpyHtoD(ptr, host, bytes), "cuMemcpyHtoD_v2");
	free(host);
	printf("gpu-hold: pid %d holds %lu MiB on device %d, copied %zu bytes\n", (int)getpid(), mib,
	       device, bytes);
	fflush(stdout);
	if (busy)
		spin(dev, seconds);
	else
		sleep(seconds);
	check(cuMemFree(ptr), "cuMemFree_v2");
	check(cuCtxDestroy(ctx), "cuCtxDestroy_v2");
	return 0;
}

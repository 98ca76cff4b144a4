/* Holds GPU memory for a while through the CUDA driver API only, so the
 * GPU check has a workload on a machine with nothing but the driver (no
 * CUDA toolkit, no Python):
 *
 *   gpu-hold [--lib LIBCUDA] [--device N] [--mib M] [--seconds S]
 *
 * dlopens libcuda.so.1 (or LIBCUDA), creates a context on device N
 * (default 0), allocates M MiB (default 1024), copies them once host to
 * device with cuMemcpyHtoD_v2 (what the pcie uprobes count), prints one
 * line `gpu-hold: pid P holds M MiB on device N, copied B bytes`, sleeps S
 * seconds (default 20), frees and exits 0. Exits 1 naming the call that
 * failed. Changes no GPU setting. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

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

int main(int argc, char **argv)
{
	const char *path = "libcuda.so.1";
	int device = 0;
	unsigned long mib = 1024, seconds = 20;
	for (int i = 1; i < argc; i++) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(argv[i], "--lib") && v)
			path = v;
		else if (!strcmp(argv[i], "--device") && v)
			device = atoi(v);
		else if (!strcmp(argv[i], "--mib") && v)
			mib = strtoul(v, NULL, 10);
		else if (!strcmp(argv[i], "--seconds") && v)
			seconds = strtoul(v, NULL, 10);
		else {
			fprintf(stderr, "usage: %s [--lib LIBCUDA] [--device N] [--mib M] [--seconds S]\n",
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
	sleep(seconds);
	check(cuMemFree(ptr), "cuMemFree_v2");
	check(cuCtxDestroy(ctx), "cuCtxDestroy_v2");
	return 0;
}

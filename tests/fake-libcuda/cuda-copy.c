/* Calls the copy entry points of a CUDA driver library with sizes from argv:
 *
 *   cuda-copy LIB SYMBOL[@h2d|@d2h] BYTES COUNT [SYMBOL BYTES COUNT]...
 *
 * dlopens LIB and calls SYMBOL COUNT times with a BYTES-byte copy. 2D forms
 * (cuMemcpy2D*) take @h2d or @d2h for the descriptor's memory types and
 * move BYTES as 4 rows of BYTES/4 (BYTES must be a multiple of 4). Exits
 * non-zero, saying why, if a symbol is missing or a call fails. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int (*copy3)(unsigned long long, unsigned long long, size_t);
typedef int (*copy4)(unsigned long long, unsigned long long, size_t, void *);
typedef int (*copy2d)(const void *, void *);

struct memcpy2d {
	size_t srcXInBytes, srcY;
	int srcMemoryType;
	const void *srcHost;
	unsigned long long srcDevice;
	void *srcArray;
	size_t srcPitch;
	size_t dstXInBytes, dstY;
	int dstMemoryType;
	void *dstHost;
	unsigned long long dstDevice;
	void *dstArray;
	size_t dstPitch;
	size_t WidthInBytes, Height;
};

int main(int argc, char **argv)
{
	if (argc < 5 || (argc - 2) % 3 != 0) {
		fprintf(stderr, "usage: %s LIB SYMBOL[@h2d|@d2h] BYTES COUNT...\n", argv[0]);
		return 2;
	}
	void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
		return 1;
	}
	static char buf[1 << 20];
	for (int i = 2; i + 2 < argc; i += 3) {
		char name[128];
		snprintf(name, sizeof(name), "%s", argv[i]);
		char *dir = strchr(name, '@');
		if (dir)
			*dir++ = 0;
		size_t bytes = strtoull(argv[i + 1], NULL, 10);
		long count = strtol(argv[i + 2], NULL, 10);
		void *fn = dlsym(lib, name);
		if (!fn) {
			fprintf(stderr, "dlsym %s: %s\n", name, dlerror());
			return 1;
		}
		int is2d = strstr(name, "2D") != NULL;
		int async = strstr(name, "Async") != NULL;
		for (long c = 0; c < count; c++) {
			int rc;
			if (is2d) {
				struct memcpy2d p;
				memset(&p, 0, sizeof(p));
				int h2d = dir && strcmp(dir, "h2d") == 0;
				p.srcMemoryType = h2d ? 1 : 2;
				p.dstMemoryType = h2d ? 2 : 1;
				p.srcHost = buf;
				p.dstHost = buf;
				p.Height = 4;
				p.WidthInBytes = bytes / 4;
				rc = ((copy2d)fn)(&p, NULL);
			} else if (async) {
				rc = ((copy4)fn)(0x1000, (unsigned long long)buf, bytes, NULL);
			} else {
				rc = ((copy3)fn)(0x1000, (unsigned long long)buf, bytes);
			}
			if (rc != 0) {
				fprintf(stderr, "%s returned %d\n", name, rc);
				return 1;
			}
		}
	}
	return 0;
}

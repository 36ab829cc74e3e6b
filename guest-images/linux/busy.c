/*
 * busy: a workload of known length for perf inside the guest.
 *
 *   busy [user|kernel|mixed] [MILLISECONDS]   (default: user 500)
 *   busy work CHUNKS                          (fixed work, for overheads)
 *
 * user:   spins in spin_user(), a named function perf report can show;
 * kernel: reads /dev/zero 64 KiB at a time, so its time is kernel time
 *         spent inside few, long system calls (the entry and exit paths,
 *         which a guest whose kernel code is emulated accounts inexactly,
 *         are a small part of it);
 * mixed:  alternates the two, about half and half on the development hosts
 *         (where one 64 KiB read takes about 6 ms of emulated kernel code);
 * work:   CHUNKS calls of spin_user (about 10 ms each natively), however
 *         long they take: what sampling costs shows in cpu_ms and wall_ms.
 * The first three spin until MILLISECONDS of their own CPU time (user +
 * system) have passed. All print
 *   busy: mode=MODE cpu_ms=MS user_ms=U sys_ms=S loops=N wall_ms=W
 * with the user and system time the kernel accounted to it from the start
 * of main (not the fork and exec before it).
 *
 * Built static by build.sh and kept unstripped, so its symbols reach perf.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/syscall.h>

static double clock_ms(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static long tv_ms(const struct timeval *tv)
{
	return tv->tv_sec * 1000 + tv->tv_usec / 1000;
}

static double cpu_ms(void)
{
	return clock_ms(CLOCK_PROCESS_CPUTIME_ID);
}

/* Never inlined: it must be the top user-mode symbol of a profile. */
__attribute__((noinline)) unsigned long spin_user(unsigned long n)
{
	volatile unsigned long x = 0;

	for (unsigned long i = 0; i < n; i++)
		x += i * 7 + (x >> 3);
	return x;
}

static char zeros[64 << 10];
static int zero_fd = -1;

__attribute__((noinline)) void spin_kernel(unsigned long n)
{
	for (unsigned long i = 0; i < n; i++)
		if (zero_fd < 0 || read(zero_fd, zeros, sizeof(zeros)) < 0)
			syscall(SYS_getppid);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "user";
	double ms = argc > 2 ? atof(argv[2]) : 500;
	int user = !strcmp(mode, "user"), kernel = !strcmp(mode, "kernel");
	int work = !strcmp(mode, "work");
	unsigned long loops = 0;
	struct rusage ru0, ru;
	double start, wall;

	if ((!user && !kernel && !work && strcmp(mode, "mixed")) || ms <= 0) {
		fprintf(stderr, "usage: busy [user|kernel|mixed] [MILLISECONDS] | busy work CHUNKS\n");
		return 2;
	}
	printf("busy: start mode=%s\n", mode);
	fflush(stdout);
	zero_fd = open("/dev/zero", O_RDONLY);
	getrusage(RUSAGE_SELF, &ru0);
	wall = clock_ms(CLOCK_MONOTONIC);
	start = cpu_ms();
	if (work)
		for (; loops < (unsigned long)ms; loops++)
			spin_user(10000000);
	/*
	 * Chunks of about 10 ms each: reading the clock is a system call, which
	 * costs far more in a guest whose kernel code is emulated than here.
	 */
	while (!work && cpu_ms() - start < ms) {
		if (!kernel)
			spin_user(10000000);
		if (!user)
			spin_kernel(kernel ? 20 : 2);
		loops++;
	}
	getrusage(RUSAGE_SELF, &ru);
	printf("busy: mode=%s cpu_ms=%.0f user_ms=%ld sys_ms=%ld loops=%lu wall_ms=%.0f\n",
	       mode, cpu_ms() - start,
	       tv_ms(&ru.ru_utime) - tv_ms(&ru0.ru_utime),
	       tv_ms(&ru.ru_stime) - tv_ms(&ru0.ru_stime), loops,
	       clock_ms(CLOCK_MONOTONIC) - wall);
	return 0;
}

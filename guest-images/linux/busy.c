/*
 * busy: a workload of known length for perf inside the guest.
 *
 *   busy [user|kernel|mixed] [MILLISECONDS]   (default: user 500)
 *   busy work CHUNKS                          (fixed work, for overheads)
 *   busy migrate PID [MS]                     (move PID between CPUs)
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
 * migrate: until task PID exits, pins it to CPU 0 and CPU 1 in turn, every
 *         MS milliseconds (default 100), from this one process (a shell
 *         loop of taskset would exec a program per move, which takes longer
 *         than 100 ms where kernel code is emulated); prints
 *           migrate: moves=N cpus_seen=LIST
 *         with the CPUs /proc/PID/stat showed it on after the moves.
 * The first three spin until MILLISECONDS of their own CPU time (user +
 * system) have passed. All print
 *   busy: mode=MODE cpu_ms=MS user_ms=U sys_ms=S loops=N wall_ms=W
 *         steal_ticks=ST total_ticks=TT
 * with the user and system time the kernel accounted to it from the start
 * of main (not the fork and exec before it), and the machine's steal and
 * total ticks over the same span.
 *
 * Built static by build.sh and kept unstripped, so its symbols reach perf.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sched.h>
#include <signal.h>

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

/* The CPU task `pid` last ran on (field 39 of /proc/PID/stat), or -1. */
static int task_cpu(int pid)
{
	char path[64], buf[1024];
	int cpu = -1, fd, n;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	/* Fields after the command name, which ends at the last ')'. */
	char *p = strrchr(buf, ')');
	for (int field = 2; p && field < 39; field++)
		p = strchr(p + 1, ' ');
	if (p)
		cpu = atoi(p + 1);
	return cpu;
}

/*
 * The whole machine's steal and total ticks so far ("cpu" line of
 * /proc/stat), or 0 and 0. Read at busy's start and end: the steal share
 * of exactly its run, where a reading around perf would also span perf's
 * start-up, seconds here under other load.
 */
static void stat_ticks(unsigned long long *steal, unsigned long long *total)
{
	unsigned long long v[8] = { 0 };
	FILE *f = fopen("/proc/stat", "r");

	*steal = *total = 0;
	if (!f)
		return;
	if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
		   &v[3], &v[4], &v[5], &v[6], &v[7]) == 8) {
		*steal = v[7];
		for (int i = 0; i < 8; i++)
			*total += v[i];
	}
	fclose(f);
}

static int migrate(int pid, double ms)
{
	unsigned long moves = 0, seen = 0;
	struct timespec next;

	/*
	 * Moves on a fixed schedule (every MS from the start), not MS after
	 * each move: a move is a system call, slow where kernel code is
	 * emulated, and would otherwise stretch every period.
	 */
	/* Ahead of the task it moves, which shares its CPU. */
	setpriority(PRIO_PROCESS, 0, -20);
	clock_gettime(CLOCK_MONOTONIC, &next);
	while (kill(pid, 0) == 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(moves % 2, &set);
		if (sched_setaffinity(pid, sizeof(set), &set) == 0)
			moves++;
		next.tv_nsec += (long)(ms * 1e6);
		next.tv_sec += next.tv_nsec / 1000000000L;
		next.tv_nsec %= 1000000000L;
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
		int cpu = task_cpu(pid);
		if (cpu >= 0 && cpu < 64)
			seen |= 1UL << cpu;
	}
	printf("migrate: moves=%lu cpus_seen=", moves);
	for (int cpu = 0; cpu < 64; cpu++)
		if (seen & (1UL << cpu))
			printf("%d ", cpu);
	printf("\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 2 && !strcmp(argv[1], "migrate"))
		return migrate(atoi(argv[2]), argc > 3 ? atof(argv[3]) : 100);

	const char *mode = argc > 1 ? argv[1] : "user";
	double ms = argc > 2 ? atof(argv[2]) : 500;
	int user = !strcmp(mode, "user"), kernel = !strcmp(mode, "kernel");
	int work = !strcmp(mode, "work");
	unsigned long loops = 0;
	struct rusage ru0, ru;
	unsigned long long steal0, total0, steal1, total1;
	double start, wall;

	if ((!user && !kernel && !work && strcmp(mode, "mixed")) || ms <= 0) {
		fprintf(stderr, "usage: busy [user|kernel|mixed] [MILLISECONDS] | busy work CHUNKS\n");
		return 2;
	}
	printf("busy: start mode=%s\n", mode);
	fflush(stdout);
	zero_fd = open("/dev/zero", O_RDONLY);
	stat_ticks(&steal0, &total0);
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
	stat_ticks(&steal1, &total1);
	printf("busy: mode=%s cpu_ms=%.0f user_ms=%ld sys_ms=%ld loops=%lu wall_ms=%.0f "
	       "steal_ticks=%llu total_ticks=%llu\n",
	       mode, cpu_ms() - start,
	       tv_ms(&ru.ru_utime) - tv_ms(&ru0.ru_utime),
	       tv_ms(&ru.ru_stime) - tv_ms(&ru0.ru_stime), loops,
	       clock_ms(CLOCK_MONOTONIC) - wall, steal1 - steal0, total1 - total0);
	return 0;
}

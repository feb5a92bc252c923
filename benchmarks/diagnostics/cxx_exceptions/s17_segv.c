/* Issue 17 crash reporter, LD_PRELOADed into the throw-test children (s17.sh builds it with cc).
 * On SIGSEGV/SIGBUS/SIGABRT/SIGFPE it prints, without unwinding (the unwinder is the suspect):
 *   S17SEGV signal <n> addr <fault address>
 *   S17SEGV pc  <pc> <library>+<file offset> [<nearest exported symbol>+<off>]
 *   S17SEGV stk ... up to 40 stack words that point into executable mappings (a rough call chain)
 * then re-raises with the default action, so the exit status stays -<signal>.
 * Mappings come from /proc/self/maps (read with read(2)); symbol names from dladdr (best effort; an alarm
 * ends the process if it hangs). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static char maps_buf[1 << 20];
static int maps_len = 0;

static void load_maps(void) {
  int fd = open("/proc/self/maps", O_RDONLY);
  maps_len = 0;
  if (fd < 0) return;
  for (;;) {
    ssize_t n = read(fd, maps_buf + maps_len, sizeof(maps_buf) - 1 - maps_len);
    if (n <= 0) break;
    maps_len += (int)n;
  }
  close(fd);
  maps_buf[maps_len] = 0;
}

/* Finds the mapping holding addr; fills path (or "") and file offset; returns 1 if executable. */
static unsigned long map_hi = 0; /* end of the last mapping find_map found */

static int find_map(unsigned long addr, const char** path, int* path_len, unsigned long* off, int* found) {
  *found = 0;
  char* p = maps_buf;
  while (p < maps_buf + maps_len) {
    char* eol = strchr(p, '\n');
    if (!eol) eol = maps_buf + maps_len;
    unsigned long lo = strtoul(p, &p, 16);
    unsigned long hi = strtoul(p + 1, &p, 16);
    char perms[5] = {0};
    memcpy(perms, p + 1, 4);
    p += 6;
    unsigned long foff = strtoul(p, &p, 16);
    if (addr >= lo && addr < hi) {
      /* skip dev and inode */
      while (*p == ' ') ++p;
      while (*p != ' ' && p < eol) ++p;
      while (*p == ' ') ++p;
      while (*p != ' ' && p < eol) ++p;
      while (*p == ' ' && p < eol) ++p;
      *path = p;
      *path_len = (int)(eol - p);
      *off = addr - lo + foff;
      *found = 1;
      map_hi = hi;
      return perms[2] == 'x';
    }
    p = eol + 1;
  }
  return 0;
}

static void report(const char* what, void* pc) {
  const char* path = "";
  int plen = 0, found = 0;
  unsigned long off = 0;
  find_map((unsigned long)pc, &path, &plen, &off, &found);
  Dl_info info;
  memset(&info, 0, sizeof info);
  const char* sym = "?";
  unsigned long soff = 0;
  if (dladdr(pc, &info) && info.dli_sname) {
    sym = info.dli_sname;
    soff = (unsigned long)((char*)pc - (char*)info.dli_saddr);
  }
  fprintf(stderr, "S17SEGV %s %p %.*s+0x%lx [%s+0x%lx]\n", what, pc, plen, found ? path : "?", off, sym, soff);
}

static void handler(int sig, siginfo_t* si, void* ucv) {
  alarm(5);
  ucontext_t* uc = (ucontext_t*)ucv;
  fprintf(stderr, "S17SEGV signal %d addr %p\n", sig, si ? si->si_addr : 0);
  load_maps();
#if defined(__x86_64__)
  void* pc = (void*)uc->uc_mcontext.gregs[REG_RIP];
  unsigned long* sp = (unsigned long*)uc->uc_mcontext.gregs[REG_RSP];
  report("pc ", pc);
  /* scan only inside the mapping that holds the stack pointer (reading past it faults) */
  const char* spath;
  int splen, sfound;
  unsigned long soff;
  find_map((unsigned long)sp, &spath, &splen, &soff, &sfound);
  unsigned long* top = sfound ? (unsigned long*)map_hi : sp;
  int shown = 0;
  for (int k = 0; k < 4096 && shown < 40 && sp + k < top; ++k) {
    const char* path;
    int plen, found;
    unsigned long off;
    void* v = (void*)sp[k];
    if (find_map((unsigned long)v, &path, &plen, &off, &found) && found) {
      report("stk", v);
      ++shown;
    }
  }
#else
  (void)uc;
#endif
  fflush(stderr);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void s17_install(void) {
  static char altstack[1 << 16];
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, 0);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigfillset(&sa.sa_mask); /* no nested reports */
  sigaction(SIGSEGV, &sa, 0);
  sigaction(SIGBUS, &sa, 0);
  sigaction(SIGABRT, &sa, 0);
  sigaction(SIGFPE, &sa, 0);
  sigaction(SIGILL, &sa, 0);
}

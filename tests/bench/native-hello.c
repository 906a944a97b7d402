/* The launch benchmark's native comparison: a static process that does what `cella-runner
 * hello` does (print one line, exit 0), with one write and no libc start-up work to speak of. */
#include <unistd.h>

int main(void) {
    static const char line[] = "hello from cella-runner\n";
    return write(2, line, sizeof line - 1) == (ssize_t)(sizeof line - 1) ? 0 : 1;
}

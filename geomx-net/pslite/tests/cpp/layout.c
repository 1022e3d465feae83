/* Prints the C layout of geomx_pslite.h's structs (compiled as C by tests/cpp_programs.rs,
 * which compares it with the Rust #[repr(C)] structs). */
#include <stddef.h>
#include <stdio.h>

#include "geomx_pslite.h"

int main(void) {
  printf("gxps_message %zu %zu %zu %zu %zu %zu\n", sizeof(gxps_message),
         offsetof(gxps_message, error), offsetof(gxps_message, keys),
         offsetof(gxps_message, lens), offsetof(gxps_message, body_len),
         offsetof(gxps_message, buffer));
  printf("gxps_outgoing %zu %zu %zu %zu %zu %zu\n", sizeof(gxps_outgoing),
         offsetof(gxps_outgoing, urgent), offsetof(gxps_outgoing, keys),
         offsetof(gxps_outgoing, val_size), offsetof(gxps_outgoing, lens),
         offsetof(gxps_outgoing, body_len));
  return 0;
}

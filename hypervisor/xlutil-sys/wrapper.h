#include <libxl.h>
#include <libxlutil.h>

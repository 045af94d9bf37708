// Argument errors raised by op functions before any graph is built. Each
// message starts with "[mlx_ext.<op>]" and names the argument and its value.
// Python sees ValueError for std::invalid_argument and TypeError for
// mlx_ext::type_error (translated in bindings.cpp).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace mlx_ext {

struct type_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Parts>
std::string concat(const char* op, const Parts&... parts) {
  std::ostringstream msg;
  msg << "[mlx_ext." << op << "] ";
  (msg << ... << parts);
  return msg.str();
}
} // namespace detail

template <typename... Parts>
[[noreturn]] void value_error(const char* op, const Parts&... parts) {
  throw std::invalid_argument(detail::concat(op, parts...));
}

template <typename... Parts>
[[noreturn]] void type_error_(const char* op, const Parts&... parts) {
  throw type_error(detail::concat(op, parts...));
}

// A failure inside a kernel's host code (driver, launch), not the caller's fault.
template <typename... Parts>
[[noreturn]] void runtime_error(const char* op, const Parts&... parts) {
  throw std::runtime_error(detail::concat(op, parts...));
}

} // namespace mlx_ext

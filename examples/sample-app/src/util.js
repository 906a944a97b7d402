// SPDX-License-Identifier: MIT
export function add(a, b) {
  return a + b;
}

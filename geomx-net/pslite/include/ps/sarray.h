// geomx-pslite: ps-lite's SArray, a shared array (copying one shares the memory).
#ifndef GEOMX_PSLITE_PS_SARRAY_H_
#define GEOMX_PSLITE_PS_SARRAY_H_

#include <algorithm>
#include <cstring>
#include <memory>
#include <ostream>
#include <vector>

#include "ps/internal/utils.h"
#include "ps/range.h"

namespace ps {

/// A shared array of V: copies share the memory (like std::shared_ptr); CopyFrom deep-copies.
template <typename V>
class SArray {
 public:
  /// The element type.
  using value_type = V;
  SArray() {}
  ~SArray() {}
  /// `size` value-initialized elements.
  explicit SArray(size_t size, V val = 0) { resize(size, val); }
  /// Takes `data` (`size` elements); `deletable` frees it with delete[] when the last copy goes.
  SArray(V* data, size_t size, bool deletable = false) {
    if (deletable) {
      reset(data, size, [](V* p) { delete[] p; });
    } else {
      reset(data, size, [](V*) {});
    }
  }
  /// A deep copy of `vec`.
  explicit SArray(const std::vector<V>& vec) { CopyFrom(vec.data(), vec.size()); }
  /// Shares the memory of an array of another type (sizes in bytes must divide evenly).
  template <typename W>
  explicit SArray(const SArray<W>& arr) {
    *this = arr;
  }
  /// Shares the memory of an array of another type.
  template <typename W>
  void operator=(const SArray<W>& arr) {
    size_ = arr.size() * sizeof(W);
    CHECK_EQ(size_ % sizeof(V), 0u) << size_ << " bytes are not a whole number of "
                                    << sizeof(V) << "-byte values";
    size_ /= sizeof(V);
    capacity_ = arr.capacity() * sizeof(W) / sizeof(V);
    ptr_ = std::shared_ptr<V>(arr.ptr(), reinterpret_cast<V*>(arr.data()));
  }
  /// Copies from an initializer list.
  SArray(const std::initializer_list<V>& list) { CopyFrom(list.begin(), list.end()); }
  /// Takes `data` with a custom deleter.
  template <typename Deleter>
  void reset(V* data, size_t size, Deleter del) {
    size_ = size;
    capacity_ = size;
    ptr_.reset(data, del);
  }
  /// Deep-copies `size` elements from `data`.
  void CopyFrom(const V* data, size_t size) {
    resize(size);
    if (size) std::memcpy(this->data(), data, size * sizeof(V));
  }
  /// Deep-copies another array.
  void CopyFrom(const SArray<V>& other) {
    if (this == &other) return;
    CopyFrom(other.data(), other.size());
  }
  /// Deep-copies [first, last).
  template <typename ForwardIt>
  void CopyFrom(const ForwardIt& first, const ForwardIt& last) {
    size_t size = static_cast<size_t>(std::distance(first, last));
    V* data = new V[size];
    reset(data, size, [](V* p) { delete[] p; });
    std::copy(first, last, data);
  }
  /// Resizes; grows by reallocating and copying (new elements set to `val`).
  void resize(size_t size, V val = 0) {
    size_t cur = size_;
    if (capacity_ >= size) {
      size_ = size;
    } else {
      V* new_data = new V[size + 5];
      if (cur) std::memcpy(new_data, data(), cur * sizeof(V));
      reset(new_data, size, [](V* p) { delete[] p; });
      capacity_ = size + 5;
    }
    if (size <= cur) return;
    V* p = data() + cur;
    if (val == 0) {
      std::memset(static_cast<void*>(p), 0, (size - cur) * sizeof(V));
    } else {
      std::fill(p, p + size - cur, val);
    }
  }
  /// Makes room for `size` elements.
  void reserve(size_t size) {
    if (capacity_ >= size) return;
    size_t old = size_;
    resize(size);
    size_ = old;
  }
  /// Drops the memory.
  void clear() { reset(nullptr, 0, [](V*) {}); }
  bool empty() const { return size() == 0; }
  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  V* begin() { return data(); }
  const V* begin() const { return data(); }
  V* end() { return data() + size(); }
  const V* end() const { return data() + size(); }
  V* data() const { return ptr_.get(); }
  /// The shared pointer behind the array.
  std::shared_ptr<V>& ptr() { return ptr_; }
  /// The shared pointer behind the array.
  const std::shared_ptr<V>& ptr() const { return ptr_; }
  V back() const {
    CHECK(!empty());
    return data()[size_ - 1];
  }
  V front() const {
    CHECK(!empty());
    return data()[0];
  }
  V& operator[](int i) { return data()[i]; }
  const V& operator[](int i) const { return data()[i]; }
  V& operator[](size_t i) { return data()[i]; }
  const V& operator[](size_t i) const { return data()[i]; }
  void push_back(const V& val) {
    if (size_ == capacity_) reserve(size_ * 2 + 5);
    data()[size_++] = val;
  }
  void pop_back() {
    if (size_) --size_;
  }
  /// Appends a deep copy of `arr`.
  void append(const SArray<V>& arr) {
    if (arr.empty()) return;
    size_t orig = size_;
    resize(size_ + arr.size());
    std::memcpy(data() + orig, arr.data(), arr.size() * sizeof(V));
  }
  /// Elements [begin, end), sharing the memory.
  SArray<V> segment(size_t begin, size_t end) const {
    CHECK_GE(end, begin);
    CHECK_LE(end, size());
    SArray<V> ret;
    ret.ptr_ = std::shared_ptr<V>(ptr_, data() + begin);
    ret.size_ = end - begin;
    ret.capacity_ = end - begin;
    return ret;
  }
  /// Elements in `range`, sharing the memory.
  SArray<V> segment(const Range& range) const { return segment(range.begin(), range.end()); }

 private:
  size_t size_ = 0;
  size_t capacity_ = 0;
  std::shared_ptr<V> ptr_;
};

/// Prints at most 10 elements.
template <typename V>
std::ostream& operator<<(std::ostream& os, const SArray<V>& obj) {
  os << "[";
  size_t n = std::min(obj.size(), static_cast<size_t>(10));
  for (size_t i = 0; i < n; ++i) os << (i ? " " : "") << obj[i];
  if (obj.size() > n) os << " ...";
  return os << "]";
}

}  // namespace ps

#endif  // GEOMX_PSLITE_PS_SARRAY_H_

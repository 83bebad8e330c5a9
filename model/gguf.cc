#include "model/gguf.h"

#include <cstring>
#include <limits>
#include <set>

#include "absl/strings/str_join.h"

namespace fedtune::model {
namespace {

using kernels::GgmlType;

constexpr uint64_t kMaxStringLen = 1ull << 30;
constexpr int kMaxDims = 4;

// Bounds-checked little-endian cursor over the file; every read fails cleanly past the end.
class Cursor {
 public:
  explicit Cursor(std::span<const uint8_t> b) : b_(b) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return b_.size() - pos_; }

  template <typename T>
  absl::Status Read(T* out, const char* what) {
    if (remaining() < sizeof(T)) return Truncated(what);
    std::memcpy(out, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  absl::Status ReadString(std::string* out, const char* what) {
    uint64_t len = 0;
    FT_RETURN_IF_ERROR(Read(&len, what));
    if (len > remaining() || len > kMaxStringLen) {
      return absl::DataLossError(absl::StrCat("GGUF: ", what, " at byte ", pos_ - 8,
                                              " claims length ", len, " but only ", remaining(),
                                              " bytes remain"));
    }
    out->assign(reinterpret_cast<const char*>(b_.data() + pos_), len);
    pos_ += len;
    return absl::OkStatus();
  }
  absl::Status Truncated(const char* what) const {
    return absl::DataLossError(absl::StrCat("GGUF: file truncated while reading ", what,
                                            " at byte ", pos_, " of ", b_.size()));
  }

 private:
  std::span<const uint8_t> b_;
  size_t pos_ = 0;
};

size_t ScalarSize(GgufType t) {
  switch (t) {
    case GgufType::kU8: case GgufType::kI8: case GgufType::kBool: return 1;
    case GgufType::kU16: case GgufType::kI16: return 2;
    case GgufType::kU32: case GgufType::kI32: case GgufType::kF32: return 4;
    case GgufType::kU64: case GgufType::kI64: case GgufType::kF64: return 8;
    case GgufType::kString: return 8;  // at least the length prefix
    case GgufType::kArray: return 12;
  }
  return 0;
}

bool ValidType(uint32_t t) { return t <= 12; }

// Reads one scalar of type t into v (the fields for scalars).
absl::Status ReadScalar(Cursor& c, GgufType t, GgufValue* v, const std::string& key) {
  v->type = t;
  switch (t) {
    case GgufType::kU8: { uint8_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "u8 value")); v->u = x; v->i = x; break; }
    case GgufType::kI8: { int8_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "i8 value")); v->i = x; v->u = static_cast<uint64_t>(x); break; }
    case GgufType::kU16: { uint16_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "u16 value")); v->u = x; v->i = x; break; }
    case GgufType::kI16: { int16_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "i16 value")); v->i = x; v->u = static_cast<uint64_t>(x); break; }
    case GgufType::kU32: { uint32_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "u32 value")); v->u = x; v->i = x; break; }
    case GgufType::kI32: { int32_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "i32 value")); v->i = x; v->u = static_cast<uint64_t>(x); break; }
    case GgufType::kU64: { uint64_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "u64 value")); v->u = x; v->i = static_cast<int64_t>(x); break; }
    case GgufType::kI64: { int64_t x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "i64 value")); v->i = x; v->u = static_cast<uint64_t>(x); break; }
    case GgufType::kF32: { float x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "f32 value")); v->f = x; break; }
    case GgufType::kF64: { double x = 0; FT_RETURN_IF_ERROR(c.Read(&x, "f64 value")); v->f = x; break; }
    case GgufType::kBool: {
      uint8_t x = 0;
      FT_RETURN_IF_ERROR(c.Read(&x, "bool value"));
      if (x > 1) return absl::DataLossError(absl::StrCat("GGUF: key '", key, "': bool value ", int{x}, " is not 0 or 1"));
      v->u = x; v->i = x;
      break;
    }
    case GgufType::kString: FT_RETURN_IF_ERROR(c.ReadString(&v->s, "string value")); break;
    case GgufType::kArray: return absl::InternalError("ReadScalar on array");
  }
  return absl::OkStatus();
}

absl::Status ReadValue(Cursor& c, GgufType t, GgufValue* v, const std::string& key) {
  if (t != GgufType::kArray) return ReadScalar(c, t, v, key);
  v->type = GgufType::kArray;
  uint32_t et = 0;
  uint64_t n = 0;
  FT_RETURN_IF_ERROR(c.Read(&et, "array element type"));
  FT_RETURN_IF_ERROR(c.Read(&n, "array length"));
  if (!ValidType(et)) return absl::DataLossError(absl::StrCat("GGUF: key '", key, "': invalid array element type ", et));
  v->array_type = static_cast<GgufType>(et);
  if (v->array_type == GgufType::kArray) {
    return absl::UnimplementedError(absl::StrCat("GGUF: key '", key, "': nested arrays are not supported"));
  }
  if (n > c.remaining() / ScalarSize(v->array_type)) {
    return absl::DataLossError(absl::StrCat("GGUF: key '", key, "': array of ", n,
                                            " elements does not fit in the ", c.remaining(), " bytes left"));
  }
  GgufValue e;
  for (uint64_t k = 0; k < n; ++k) {
    FT_RETURN_IF_ERROR(ReadScalar(c, v->array_type, &e, key));
    if (v->array_type == GgufType::kString) {
      v->strings.push_back(std::move(e.s));
    } else if (e.is_float()) {
      v->floats.push_back(e.f);
    } else {
      v->ints.push_back(e.i);
    }
  }
  return absl::OkStatus();
}

const char* TypeName(GgufType t) {
  static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                                "string", "array", "u64", "i64", "f64"};
  return static_cast<uint32_t>(t) <= 12 ? names[static_cast<uint32_t>(t)] : "?";
}

}  // namespace

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufType::kU8: case GgufType::kI8: case GgufType::kU16: case GgufType::kI16:
    case GgufType::kU32: case GgufType::kI32: case GgufType::kU64: case GgufType::kI64:
      return true;
    default: return false;
  }
}

size_t GgufValue::array_size() const { return strings.size() + ints.size() + floats.size(); }

std::string GgufValue::ToString(size_t max_items) const {
  if (type == GgufType::kString) return "\"" + s + "\"";
  if (type == GgufType::kBool) return u ? "true" : "false";
  if (is_float()) return absl::StrCat(f);
  if (type == GgufType::kU64) return absl::StrCat(u);
  if (is_integer()) return absl::StrCat(i);
  std::vector<std::string> items;
  for (size_t k = 0; k < std::min(max_items, array_size()); ++k) {
    if (!strings.empty()) items.push_back("\"" + strings[k] + "\"");
    else if (!floats.empty()) items.push_back(absl::StrCat(floats[k]));
    else items.push_back(absl::StrCat(ints[k]));
  }
  return absl::StrCat("[", TypeName(array_type), " x ", array_size(), "] [", absl::StrJoin(items, ", "),
                      array_size() > max_items ? ", ..." : "", "]");
}

int64_t GgufTensor::n_elements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

kernels::QMatrix GgufTensor::AsMatrix() const {
  FT_CHECK(ne.size() <= 2);
  kernels::QMatrix m;
  m.type = type;
  m.data = data;
  m.cols = ne[0];
  m.rows = ne.size() > 1 ? ne[1] : 1;
  m.row_bytes = nbytes / static_cast<size_t>(m.rows == 0 ? 1 : m.rows);
  return m;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path, bool private_types) {
  FT_ASSIGN_OR_RETURN(auto f, MappedFile::Open(path));
  auto parsed = Parse(std::move(f), private_types);
  if (!parsed.ok()) {
    return absl::Status(parsed.status().code(), absl::StrCat(path, ": ", parsed.status().message()));
  }
  return parsed;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Parse(std::unique_ptr<MappedFile> file, bool private_types) {
  std::unique_ptr<GgufFile> g(new GgufFile());
  g->file_ = std::move(file);
  const auto bytes = g->file_->bytes();
  Cursor c(bytes);
  uint32_t magic = 0;
  FT_RETURN_IF_ERROR(c.Read(&magic, "magic"));
  if (std::memcmp(&magic, "GGUF", 4) != 0) return absl::DataLossError("not a GGUF file (bad magic)");
  FT_RETURN_IF_ERROR(c.Read(&g->version_, "version"));
  if (g->version_ != 2 && g->version_ != 3) {
    return absl::UnimplementedError(absl::StrCat("GGUF version ", g->version_, " is not supported (2 or 3)"));
  }
  uint64_t n_tensors = 0, n_kv = 0;
  FT_RETURN_IF_ERROR(c.Read(&n_tensors, "tensor count"));
  FT_RETURN_IF_ERROR(c.Read(&n_kv, "metadata count"));
  // Each key/value takes >= 12 bytes and each tensor info >= 24: reject absurd counts early.
  if (n_kv > c.remaining() / 12) return absl::DataLossError(absl::StrCat("GGUF: metadata count ", n_kv, " exceeds what the file can hold"));
  if (n_tensors > c.remaining() / 24) return absl::DataLossError(absl::StrCat("GGUF: tensor count ", n_tensors, " exceeds what the file can hold"));

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key;
    FT_RETURN_IF_ERROR(c.ReadString(&key, "metadata key"));
    uint32_t t = 0;
    FT_RETURN_IF_ERROR(c.Read(&t, "metadata value type"));
    if (!ValidType(t)) return absl::DataLossError(absl::StrCat("GGUF: key '", key, "' has invalid value type ", t));
    GgufValue v;
    FT_RETURN_IF_ERROR(ReadValue(c, static_cast<GgufType>(t), &v, key));
    if (g->kv_.count(key)) return absl::DataLossError(absl::StrCat("GGUF: duplicate metadata key '", key, "'"));
    g->key_order_.push_back(key);
    g->kv_.emplace(std::move(key), std::move(v));
  }

  uint64_t alignment = 32;
  if (const GgufValue* a = g->Find("general.alignment")) {
    if (!a->is_integer() || a->i <= 0 || a->i > (1 << 20) || (a->i & (a->i - 1)) != 0) {
      return absl::DataLossError("GGUF: general.alignment must be a positive power of two integer");
    }
    alignment = static_cast<uint64_t>(a->i);
  }

  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensor t;
    FT_RETURN_IF_ERROR(c.ReadString(&t.name, "tensor name"));
    if (t.name.size() > 64) return absl::DataLossError(absl::StrCat("GGUF: tensor name longer than 64 bytes: '", t.name.substr(0, 64), "...'"));
    uint32_t n_dims = 0;
    FT_RETURN_IF_ERROR(c.Read(&n_dims, "tensor dimension count"));
    if (n_dims < 1 || n_dims > kMaxDims) return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' has ", n_dims, " dimensions (1 to 4 allowed)"));
    int64_t n_el = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      int64_t ne = 0;
      FT_RETURN_IF_ERROR(c.Read(&ne, "tensor shape"));
      if (ne < 0) return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' has negative dimension ", ne));
      if (ne > 0 && n_el > std::numeric_limits<int64_t>::max() / ne) return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' shape overflows"));
      n_el *= ne;
      t.ne.push_back(ne);
    }
    uint32_t type = 0;
    FT_RETURN_IF_ERROR(c.Read(&type, "tensor type"));
    // fedtune's in-memory types (NF4, NF4_DQ, NF3, NF2: ids from 0x1000) are valid only in
    // fedtune's own files opened with private_types (the compensation cache), as matrices.
    const bool private_type = type >= static_cast<uint32_t>(GgmlType::kNF4);
    const auto traits = private_type && !private_types ? std::nullopt : kernels::GetTypeTraits(type);
    if (!traits) return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' has unknown type id ", type));
    if (private_type && n_dims != 2) return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' of a private type is not a matrix"));
    if (!traits->supported) return absl::UnimplementedError(absl::StrCat("GGUF: tensor '", t.name, "' has block type ", traits->name, ", which fedtune cannot dequantize"));
    t.type = static_cast<GgmlType>(type);
    if (t.ne[0] % traits->block_size != 0) {
      return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' row of ", t.ne[0], " values is not a multiple of ", traits->name, "'s block size ", traits->block_size));
    }
    FT_RETURN_IF_ERROR(c.Read(&t.offset, "tensor offset"));
    if (t.offset % alignment != 0) return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' offset ", t.offset, " is not aligned to ", alignment));
    const uint64_t blocks = static_cast<uint64_t>(n_el / traits->block_size);
    if (blocks > std::numeric_limits<uint64_t>::max() / (traits->type_size + 8)) return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' size overflows"));
    t.nbytes = blocks * traits->type_size;
    if (private_type) {  // NF4_DQ: a header per row
      const uint64_t rb = *kernels::RowBytes(t.type, t.ne[0]);
      if (t.ne[0] == 0 || static_cast<uint64_t>(t.ne[1]) > std::numeric_limits<uint64_t>::max() / rb)
        return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' has an empty or overflowing shape"));
      t.nbytes = static_cast<uint64_t>(t.ne[1]) * rb;
    }
    if (g->tensor_index_.count(t.name)) return absl::DataLossError(absl::StrCat("GGUF: duplicate tensor name '", t.name, "'"));
    g->tensor_index_[t.name] = g->tensors_.size();
    g->tensors_.push_back(std::move(t));
  }

  const uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  for (auto& t : g->tensors_) {
    if (data_start > bytes.size() || t.offset > bytes.size() - data_start ||
        t.nbytes > bytes.size() - data_start - t.offset) {
      return absl::DataLossError(absl::StrCat("GGUF: tensor '", t.name, "' (", t.nbytes, " bytes at offset ", t.offset,
                                              ") lies past the end of the file (", bytes.size(), " bytes)"));
    }
    t.data = bytes.data() + data_start + t.offset;
  }
  return g;
}

const GgufValue* GgufFile::Find(const std::string& key) const {
  auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::FindTensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF: metadata key '", key, "' not found"));
  if (!v->is_integer()) return absl::InvalidArgumentError(absl::StrCat("GGUF: key '", key, "' is ", TypeName(v->type), ", expected an integer"));
  if (v->type == GgufType::kU64 && v->u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF: key '", key, "' value out of range"));
  }
  return v->i;
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF: metadata key '", key, "' not found"));
  if (v->is_float()) return v->f;
  if (v->is_integer()) return static_cast<double>(v->i);
  return absl::InvalidArgumentError(absl::StrCat("GGUF: key '", key, "' is ", TypeName(v->type), ", expected a number"));
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF: metadata key '", key, "' not found"));
  if (v->type != GgufType::kString) return absl::InvalidArgumentError(absl::StrCat("GGUF: key '", key, "' is ", TypeName(v->type), ", expected a string"));
  return v->s;
}

absl::StatusOr<bool> GgufFile::GetBool(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF: metadata key '", key, "' not found"));
  if (v->type != GgufType::kBool) return absl::InvalidArgumentError(absl::StrCat("GGUF: key '", key, "' is ", TypeName(v->type), ", expected a bool"));
  return v->u != 0;
}

absl::StatusOr<const GgufValue*> GgufFile::GetArray(const std::string& key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat("GGUF: metadata key '", key, "' not found"));
  if (v->type != GgufType::kArray) return absl::InvalidArgumentError(absl::StrCat("GGUF: key '", key, "' is ", TypeName(v->type), ", expected an array"));
  return v;
}

int64_t GgufFile::GetIntOr(const std::string& key, int64_t def) const {
  auto v = GetInt(key);
  return v.ok() ? *v : def;
}

double GgufFile::GetFloatOr(const std::string& key, double def) const {
  auto v = GetFloat(key);
  return v.ok() ? *v : def;
}

// ---------------- writer ----------------

namespace {
template <typename T>
void Put(std::vector<uint8_t>& out, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}
void PutStr(std::vector<uint8_t>& out, const std::string& s) {
  Put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}
}  // namespace

void GgufWriter::PutKey(const std::string& key, GgufType type) {
  PutStr(kv_bytes_, key);
  Put<uint32_t>(kv_bytes_, static_cast<uint32_t>(type));
  ++n_kv_;
}

void GgufWriter::SetString(const std::string& key, const std::string& v) { PutKey(key, GgufType::kString); PutStr(kv_bytes_, v); }
void GgufWriter::SetU32(const std::string& key, uint32_t v) { PutKey(key, GgufType::kU32); Put(kv_bytes_, v); }
void GgufWriter::SetI32(const std::string& key, int32_t v) { PutKey(key, GgufType::kI32); Put(kv_bytes_, v); }
void GgufWriter::SetU64(const std::string& key, uint64_t v) { PutKey(key, GgufType::kU64); Put(kv_bytes_, v); }
void GgufWriter::SetF32(const std::string& key, float v) { PutKey(key, GgufType::kF32); Put(kv_bytes_, v); }
void GgufWriter::SetBool(const std::string& key, bool v) { PutKey(key, GgufType::kBool); Put<uint8_t>(kv_bytes_, v ? 1 : 0); }

void GgufWriter::SetStringArray(const std::string& key, const std::vector<std::string>& v) {
  PutKey(key, GgufType::kArray);
  Put<uint32_t>(kv_bytes_, static_cast<uint32_t>(GgufType::kString));
  Put<uint64_t>(kv_bytes_, v.size());
  for (const auto& s : v) PutStr(kv_bytes_, s);
}
void GgufWriter::SetI32Array(const std::string& key, const std::vector<int32_t>& v) {
  PutKey(key, GgufType::kArray);
  Put<uint32_t>(kv_bytes_, static_cast<uint32_t>(GgufType::kI32));
  Put<uint64_t>(kv_bytes_, v.size());
  for (int32_t x : v) Put(kv_bytes_, x);
}
void GgufWriter::SetF32Array(const std::string& key, const std::vector<float>& v) {
  PutKey(key, GgufType::kArray);
  Put<uint32_t>(kv_bytes_, static_cast<uint32_t>(GgufType::kF32));
  Put<uint64_t>(kv_bytes_, v.size());
  for (float x : v) Put(kv_bytes_, x);
}

void GgufWriter::SetValue(const std::string& key, const GgufValue& v) {
  auto put_scalar = [&](GgufType t, const GgufValue& s, size_t idx, bool from_array) {
    switch (t) {
      case GgufType::kString: PutStr(kv_bytes_, from_array ? v.strings[idx] : s.s); break;
      case GgufType::kF32: Put<float>(kv_bytes_, static_cast<float>(from_array ? v.floats[idx] : s.f)); break;
      case GgufType::kF64: Put<double>(kv_bytes_, from_array ? v.floats[idx] : s.f); break;
      default: {
        const int64_t x = from_array ? v.ints[idx] : s.i;
        switch (t) {
          case GgufType::kU8: case GgufType::kI8: case GgufType::kBool: Put<uint8_t>(kv_bytes_, static_cast<uint8_t>(x)); break;
          case GgufType::kU16: case GgufType::kI16: Put<uint16_t>(kv_bytes_, static_cast<uint16_t>(x)); break;
          case GgufType::kU32: case GgufType::kI32: Put<uint32_t>(kv_bytes_, static_cast<uint32_t>(x)); break;
          default: Put<uint64_t>(kv_bytes_, static_cast<uint64_t>(x)); break;
        }
      }
    }
  };
  PutKey(key, v.type);
  if (v.type != GgufType::kArray) {
    put_scalar(v.type, v, 0, false);
    return;
  }
  Put<uint32_t>(kv_bytes_, static_cast<uint32_t>(v.array_type));
  Put<uint64_t>(kv_bytes_, v.array_size());
  for (size_t k = 0; k < v.array_size(); ++k) put_scalar(v.array_type, v, k, true);
}

absl::Status GgufWriter::AddTensor(const std::string& name, std::vector<int64_t> ne, kernels::GgmlType type,
                                   std::span<const uint8_t> data) {
  if (name.size() > 64) return absl::InvalidArgumentError(absl::StrCat("tensor name '", name, "' is longer than 64 bytes"));
  if (static_cast<uint32_t>(type) >= static_cast<uint32_t>(kernels::GgmlType::kNF4) && !private_types_)
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': ", kernels::TypeTraits(type).name, " is in-memory only, not a GGUF type"));
  if (ne.empty() || ne.size() > 4) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' must have 1 to 4 dims"));
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  FT_ASSIGN_OR_RETURN(size_t row, kernels::RowBytes(type, ne[0]));
  const size_t expect = ne[0] == 0 ? 0 : row * static_cast<size_t>(n / ne[0]);
  if (data.size() != expect) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': ", data.size(), " bytes given, ", expect, " expected"));
  }
  for (const auto& t : tensors_) {
    if (t.name == name) return absl::InvalidArgumentError(absl::StrCat("duplicate tensor '", name, "'"));
  }
  tensors_.push_back({name, std::move(ne), type, std::vector<uint8_t>(data.begin(), data.end())});
  return absl::OkStatus();
}

absl::Status GgufWriter::AddTensorF32(const std::string& name, std::vector<int64_t> ne,
                                      kernels::GgmlType type, std::span<const float> values) {
  if (ne.empty()) return absl::InvalidArgumentError("empty shape");
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  if (static_cast<size_t>(n) != values.size()) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': shape/value count mismatch"));
  FT_ASSIGN_OR_RETURN(size_t row, kernels::RowBytes(type, ne[0]));
  const int64_t rows = ne[0] == 0 ? 0 : n / ne[0];
  std::vector<uint8_t> bytes(row * static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    FT_RETURN_IF_ERROR(kernels::QuantizeRow(type, values.data() + r * ne[0], bytes.data() + static_cast<size_t>(r) * row, ne[0]));
  }
  return AddTensor(name, std::move(ne), type, bytes);
}

std::vector<uint8_t> GgufWriter::Serialize() const {
  std::vector<uint8_t> out;
  out.insert(out.end(), {'G', 'G', 'U', 'F'});
  Put<uint32_t>(out, 3);
  Put<uint64_t>(out, tensors_.size());
  Put<uint64_t>(out, n_kv_ + (alignment_ != 32 ? 1 : 0));
  out.insert(out.end(), kv_bytes_.begin(), kv_bytes_.end());
  if (alignment_ != 32) {
    PutStr(out, "general.alignment");
    Put<uint32_t>(out, static_cast<uint32_t>(GgufType::kU32));
    Put<uint32_t>(out, alignment_);
  }
  uint64_t offset = 0;
  auto pad = [&](uint64_t x) { return (x + alignment_ - 1) / alignment_ * alignment_; };
  for (const auto& t : tensors_) {
    PutStr(out, t.name);
    Put<uint32_t>(out, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) Put<int64_t>(out, d);
    Put<uint32_t>(out, static_cast<uint32_t>(t.type));
    Put<uint64_t>(out, offset);
    offset = pad(offset + t.data.size());
  }
  out.resize(pad(out.size()), 0);
  for (const auto& t : tensors_) {
    out.insert(out.end(), t.data.begin(), t.data.end());
    out.resize(pad(out.size()), 0);
  }
  return out;
}

absl::Status GgufWriter::WriteFile(const std::string& path) const {
  const auto bytes = Serialize();
  return WriteFileAtomic(path, bytes);
}

}  // namespace fedtune::model

#include "common/config_loader.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "common/config_options.pb.h"
#include "common/mapped_file.h"
#include "google/protobuf/descriptor.h"
#include "yaml-cpp/yaml.h"

namespace fedtune {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

std::string Join(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "." + key;
}

class Loader {
 public:
  explicit Loader(std::string source) : source_(std::move(source)) {}

  absl::Status Error(const std::string& path, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", path.empty() ? "<root>" : path, ": ", what));
  }

  absl::Status FillMessage(const YAML::Node& node, Message* msg, const std::string& path) {
    if (!node.IsMap() && !node.IsNull()) return Error(path, "expected a mapping");
    const Descriptor* desc = msg->GetDescriptor();
    if (node.IsMap()) {
      for (const auto& kv : node) {
        if (!kv.first.IsScalar()) return Error(path, "keys must be plain strings");
        const std::string key = kv.first.Scalar();
        const FieldDescriptor* f = desc->FindFieldByName(key);
        if (f == nullptr) {
          return Error(Join(path, key), absl::StrCat("unknown key (", desc->name(), " has no such field)"));
        }
        FT_RETURN_IF_ERROR(FillField(kv.second, msg, f, Join(path, key)));
      }
    }
    for (int i = 0; i < desc->field_count(); ++i) {
      const FieldDescriptor* f = desc->field(i);
      if (!f->options().GetExtension(config::required)) continue;
      const Reflection* r = msg->GetReflection();
      const bool present = f->is_repeated() ? r->FieldSize(*msg, f) > 0 : r->HasField(*msg, f);
      bool in_yaml = node.IsMap() && node[f->name()].IsDefined();
      if (!present && !in_yaml) return Error(Join(path, f->name()), "required key is missing");
    }
    return absl::OkStatus();
  }

  absl::Status FillField(const YAML::Node& node, Message* msg, const FieldDescriptor* f,
                         const std::string& path) {
    const Reflection* r = msg->GetReflection();
    if (f->is_map()) return Error(path, "map fields are not supported in configs");
    if (f->is_repeated()) {
      if (!node.IsSequence()) return Error(path, "expected a list");
      r->ClearField(msg, f);
      for (size_t i = 0; i < node.size(); ++i) {
        FT_RETURN_IF_ERROR(AddScalarOrMessage(node[i], msg, f, absl::StrCat(path, "[", i, "]"), true));
      }
      return absl::OkStatus();
    }
    return AddScalarOrMessage(node, msg, f, path, false);
  }

  absl::Status AddScalarOrMessage(const YAML::Node& node, Message* msg, const FieldDescriptor* f,
                                  const std::string& path, bool repeated) {
    const Reflection* r = msg->GetReflection();
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      Message* sub = repeated ? r->AddMessage(msg, f) : r->MutableMessage(msg, f);
      return FillMessage(node, sub, path);
    }
    if (!node.IsScalar()) return Error(path, "expected a scalar value");
    const std::string& s = node.Scalar();
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT32:
      case FieldDescriptor::CPPTYPE_INT64:
      case FieldDescriptor::CPPTYPE_UINT32:
      case FieldDescriptor::CPPTYPE_UINT64: {
        errno = 0;
        char* end = nullptr;
        const bool is_unsigned = f->cpp_type() == FieldDescriptor::CPPTYPE_UINT32 ||
                                 f->cpp_type() == FieldDescriptor::CPPTYPE_UINT64;
        if (is_unsigned && !s.empty() && s[0] == '-') return Error(path, absl::StrCat("expected a non-negative integer, got '", s, "'"));
        long long sv = 0;
        unsigned long long uv = 0;
        if (is_unsigned) uv = std::strtoull(s.c_str(), &end, 0); else sv = std::strtoll(s.c_str(), &end, 0);
        if (s.empty() || end == nullptr || *end != '\0') return Error(path, absl::StrCat("expected an integer, got '", s, "'"));
        if (errno == ERANGE) return Error(path, absl::StrCat("integer out of range: ", s));
        switch (f->cpp_type()) {
          case FieldDescriptor::CPPTYPE_INT32:
            if (sv < std::numeric_limits<int32_t>::min() || sv > std::numeric_limits<int32_t>::max()) return Error(path, absl::StrCat("integer out of 32-bit range: ", s));
            repeated ? r->AddInt32(msg, f, static_cast<int32_t>(sv)) : r->SetInt32(msg, f, static_cast<int32_t>(sv));
            break;
          case FieldDescriptor::CPPTYPE_INT64:
            repeated ? r->AddInt64(msg, f, sv) : r->SetInt64(msg, f, sv);
            break;
          case FieldDescriptor::CPPTYPE_UINT32:
            if (uv > std::numeric_limits<uint32_t>::max()) return Error(path, absl::StrCat("integer out of 32-bit range: ", s));
            repeated ? r->AddUInt32(msg, f, static_cast<uint32_t>(uv)) : r->SetUInt32(msg, f, static_cast<uint32_t>(uv));
            break;
          default:
            repeated ? r->AddUInt64(msg, f, uv) : r->SetUInt64(msg, f, uv);
        }
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_FLOAT:
      case FieldDescriptor::CPPTYPE_DOUBLE: {
        char* end = nullptr;
        double v;
        if (s == ".inf" || s == ".Inf") v = std::numeric_limits<double>::infinity();
        else if (s == "-.inf" || s == "-.Inf") v = -std::numeric_limits<double>::infinity();
        else v = std::strtod(s.c_str(), &end);
        if (end != nullptr && (s.empty() || *end != '\0')) return Error(path, absl::StrCat("expected a number, got '", s, "'"));
        if (std::isnan(v)) return Error(path, "NaN is not a valid config value");
        if (f->cpp_type() == FieldDescriptor::CPPTYPE_FLOAT) {
          repeated ? r->AddFloat(msg, f, static_cast<float>(v)) : r->SetFloat(msg, f, static_cast<float>(v));
        } else {
          repeated ? r->AddDouble(msg, f, v) : r->SetDouble(msg, f, v);
        }
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_BOOL: {
        bool v;
        if (s == "true" || s == "True" || s == "TRUE") v = true;
        else if (s == "false" || s == "False" || s == "FALSE") v = false;
        else return Error(path, absl::StrCat("expected true or false, got '", s, "'"));
        repeated ? r->AddBool(msg, f, v) : r->SetBool(msg, f, v);
        return absl::OkStatus();
      }
      case FieldDescriptor::CPPTYPE_STRING:
        repeated ? r->AddString(msg, f, s) : r->SetString(msg, f, s);
        return absl::OkStatus();
      case FieldDescriptor::CPPTYPE_ENUM: {
        const auto* ev = f->enum_type()->FindValueByName(s);
        if (ev == nullptr) {
          std::string names;
          for (int i = 0; i < f->enum_type()->value_count(); ++i) {
            absl::StrAppend(&names, i ? ", " : "", f->enum_type()->value(i)->name());
          }
          return Error(path, absl::StrCat("unknown value '", s, "' (expected one of: ", names, ")"));
        }
        repeated ? r->AddEnum(msg, f, ev) : r->SetEnum(msg, f, ev);
        return absl::OkStatus();
      }
      default:
        return Error(path, "unsupported field type");
    }
  }

 private:
  std::string source_;
};

}  // namespace

absl::Status LoadConfigYaml(const std::string& yaml_text, google::protobuf::Message* out,
                            const std::string& source_name) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source_name, ": YAML syntax error at line ",
                                                   e.mark.line + 1, ", column ", e.mark.column + 1,
                                                   ": ", e.msg));
  }
  out->Clear();
  Loader loader(source_name);
  try {
    return loader.FillMessage(root, out, "");
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source_name, ": ", e.what()));
  }
}

absl::Status LoadConfigFile(const std::string& path, google::protobuf::Message* out) {
  FT_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return LoadConfigYaml(text, out, path);
}

}  // namespace fedtune
